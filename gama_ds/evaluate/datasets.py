"""The sets `gama-ds score` knows: LTU's ten (the rules of src/ltu/eval/eval_*.py) and ours.

kind: "single" (one class per clip, top-1), "multi" (several, mAP over classes), "caption"
(five references per clip, CIDEr-D/SPICE), "exact" (short answers compared as text).
clip: the cosine similarities are clipped at 0 before the argmax. LTU's `get_pred(mode='max')`
starts from zeros and keeps max(score, cosine), so an all-negative row ties at 0 and goes to
class 0; its `mode='accu'` (ESC-50, FSD50K, AudioSet) adds the one cosine to 0, no clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

from .files import ScoreInputError


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    kind: str
    metric: str  # acc | micro_f1 | map | cider_d
    answer: str  # ANSWER_RULES name under the LTU parse
    truth: str  # TRUTH_RULES name under the LTU parse
    labels: str | None = None  # LABEL_RULES name
    clip: bool = False
    classes: int | None = None  # LTU's num_class, checked against the label file
    rows: int | None = None  # rows LTU's script asserts
    ltu: bool = True  # LTU ships a script: the LTU parse is the default
    # What `gama-ds eval --suite` asks every clip (LTU's inference_batch.py); None: each row's own
    # instruction (our sets, whose eval files carry the question).
    prompt: str | None = None

    @property
    def plain_answer(self) -> str:
        return "plain_answer"

    @property
    def plain_truth(self) -> str:
        return "plain_ref_multi" if self.kind == "multi" else "plain_ref"


# LTU's fixed prompts (src/ltu/inference_batch.py): one for every classification set, one per
# captioning set.
CAPTION_PROMPT = "Close-ended question: Write an audio caption describing the sound."
AUDIOCAPS_PROMPT = "Close-ended question: Write an audio caption describing the sound, in AudioCaps style."
CLOTHO_PROMPT = "Close-ended question: Create a caption for audio, in Clotho style."

# Answer cuts (parse.ANSWER_RULES) shared by several sets.
_LSTRIP, _DROP1, _AC2 = "ltu_colon_lstrip", "ltu_colon_drop1", "ltu_audio_caption_drop2"
_PLAIN = dict(answer="plain_answer", truth="plain_ref", ltu=False)
DATASETS = {
    d.name: d
    for d in (
        Dataset(
            "esc50",
            "ESC-50",
            "single",
            "acc",
            _LSTRIP,
            "ltu_colon",
            "ltu_name",
            False,
            50,
            2000,
            prompt=CAPTION_PROMPT,
        ),
        Dataset(
            "dcase",
            "DCASE 2017",
            "single",
            "micro_f1",
            _DROP1,
            "ltu_colon_no_comma",
            "ltu_name",
            True,
            17,
            prompt=CAPTION_PROMPT,
        ),
        Dataset(
            "vs",
            "VocalSound",
            "single",
            "acc",
            _DROP1,
            "ltu_colon",
            "ltu_name",
            True,
            6,
            prompt=CAPTION_PROMPT,
        ),
        Dataset(
            "tut",
            "TUT 2017",
            "single",
            "acc",
            _DROP1,
            "ltu_colon_underscore",
            "ltu_name",
            True,
            15,
            prompt=CAPTION_PROMPT,
        ),
        Dataset(
            "bjo",
            "BJO",
            "single",
            "acc",
            _DROP1,
            "ltu_colon_no_shy_comma",
            "ltu_name",
            True,
            4,
            prompt=CAPTION_PROMPT,
        ),
        Dataset(
            "vgg",
            "VGGSound",
            "single",
            "acc",
            _AC2,
            "ltu_colon_space_lower",
            "ltu_vgg",
            True,
            309,
            prompt=CAPTION_PROMPT,
        ),
        Dataset(
            "fsd50k",
            "FSD50K",
            "multi",
            "map",
            _AC2,
            "ltu_colon_space_multi",
            "ltu_fsd",
            False,
            200,
            prompt=CAPTION_PROMPT,
        ),
        Dataset(
            "as",
            "AudioSet",
            "multi",
            "map",
            _AC2,
            "ltu_colon_space_multi",
            "ltu_as",
            False,
            527,
            prompt=CAPTION_PROMPT,
        ),
        # Captions: LTU cuts both pred and ref with split(':')[-1][1:].
        Dataset("audiocaps", "AudioCaps", "caption", "cider_d", _DROP1, _DROP1, prompt=AUDIOCAPS_PROMPT),
        Dataset("clotho", "Clotho", "caption", "cider_d", _DROP1, _DROP1, prompt=CLOTHO_PROMPT),
        # Ours: no LTU or GAMA script exists; the whole answer, labels as LTU names them.
        Dataset("plain", "any single-label set", "single", "acc", labels="ltu_name", **_PLAIN),
        Dataset("gtzan", "GTZAN genres", "single", "acc", labels="ltu_name", **_PLAIN),
        Dataset("nsynth", "NSynth instrument family", "single", "acc", labels="ltu_name", **_PLAIN),
        Dataset("medley", "Medley-solos-DB", "single", "acc", labels="ltu_name", **_PLAIN),
        Dataset("clothoaqa", "ClothoAQA", "exact", "acc", **_PLAIN),
    )
}

CAPTION_TRIALS = 5  # LTU: five rows per clip, trial t = each clip's t-th prediction


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ScoreInputError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]
