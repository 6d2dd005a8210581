"""Audio event tags: the tagger fed from stored features, `gama-ds tag`, `convert --tagger`, and
the tags as iter_samples and the training stream read them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from conftest import TAGGER_LABELS, write_audio
from gama_ds import audio
from gama_ds.cli import main
from gama_ds.data.collate import Collator
from gama_ds.data.plan import EpochPlan
from gama_ds.data.shards import ShardError, iter_samples, read_index, sha256_file, verify
from gama_ds.data.stream import Reader, StreamConfig, StreamError, StreamLoader, TrainStream, open_sets
from gama_ds.data.tokenizer import byte_tokenizer
from gama_ds.synth import synthesize
from gama_ds.tags import Tagger
from gama_ds.tags.tag_set import write_index

# A real recording shipped with CPython itself (its test suite's plucked string: 11.025 kHz,
# stereo, 0.3 s); a synthesised file stands in where an interpreter was installed without it.
PLUCK = os.path.join(sysconfig.get_path("stdlib"), "test", "audiodata", "pluck-pcm16.wav")
QUIET = ["--no-progress", "--workers", "1", "--device", "cpu"]  # CPU: fp32, comparable exactly


def set_tags(root: str) -> dict:
    return {
        s.key: s.meta.get("tags")
        for e in read_index(root)["shards"]
        for s in iter_samples(f"{root}/{e['file']}")
    }


def tar_digests(root: str) -> dict:
    return {e["file"]: sha256_file(os.path.join(root, e["file"])) for e in read_index(root)["shards"]}


def convert_synth(tmp, name: str, *extra: str) -> str:
    """8 synthetic clips (the same ones in every call) converted into tmp/name, 3 per shard."""
    data = synthesize(str(tmp / "audio"), clips=8, test_clips=0, seed=3)
    out = str(tmp / name)
    argv = ["convert", data["train"], "--out", out, "--shard-samples", "3", *QUIET, *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def tagger(tiny_tagger):
    return Tagger(tiny_tagger, device="cpu")


@pytest.mark.parametrize("clip", ["real pluck", "11 s stereo 44.1 kHz"])
def test_the_tagger_input_from_stored_features_is_ast_s_own(clip, tagger, tiny_tagger, tmp_path):
    """The stored features, renormalised and padded, are what ASTFeatureExtractor makes of the
    same audio, and the tagger's logits agree both ways. The extractor gets the file's first
    channel at 16 kHz as it is, its mean not subtracted: Kaldi's per-frame DC removal makes GAMA's
    waveform-mean subtraction a no-op. Bounds: in float32 the two differ by float rounding
    (log-mel of near-empty bins amplifies it, ~1e-4); the shards store float16, whose rounding
    (relative 2^-11 of values up to ~6 in GAMA units, times 4.4849 / (2 x 4.569) in AST units)
    stays under 2e-3."""
    import torchaudio.functional
    from transformers import ASTFeatureExtractor

    path = PLUCK if clip == "real pluck" and os.path.isfile(PLUCK) else None
    path = path or write_audio(str(tmp_path / "clip.wav"), 11.0 if "11" in clip else 0.3, 44100, 2, seed=5)
    feats, info = audio.load_features(path)
    wav, sr = audio.read_audio(path)
    first = torchaudio.functional.resample(torch.from_numpy(wav), sr, 16000)[0].numpy()
    extractor = ASTFeatureExtractor.from_pretrained(tiny_tagger)
    theirs = extractor(first, sampling_rate=16000, return_tensors="pt")["input_values"]
    assert theirs.shape == (1, 1024, 128)
    stored = feats.astype(np.float16)
    exact, ours = tagger.inputs([feats]), tagger.inputs([stored])
    assert (exact - theirs).abs().max() < 2e-4
    assert (ours - theirs).abs().max() < 2e-3
    # What the bound rules out: our features as they are stored, not renormalised.
    assert (audio.pad_features(torch.from_numpy(stored))[None] - theirs).abs().max() > 0.5
    with torch.inference_mode():
        their_logits = tagger.model(input_values=theirs).logits
    assert torch.allclose(tagger.logits([stored]), their_logits, atol=1e-4, rtol=1e-3)


def test_scores_activation_and_description(tagger, tiny_tagger, tmp_path):
    fbank = audio.load_features(write_audio(str(tmp_path / "tone.wav"), 1.0))[0]
    (all_tags,) = tagger.tag([fbank], top_k=len(TAGGER_LABELS), threshold=0.0)
    scores = [s for _, s in all_tags]
    assert [lab for lab, _ in all_tags] != TAGGER_LABELS and sorted(scores, reverse=True) == scores
    assert sum(scores) > 1.5  # sigmoid (problem_type multi_label): scores do not share one unit
    soft = Tagger(tiny_tagger, device="cpu", activation="softmax")
    (soft_tags,) = soft.tag([fbank], top_k=len(TAGGER_LABELS), threshold=0.0)
    assert abs(sum(s for _, s in soft_tags) - 1.0) < 1e-5
    assert [lab for lab, _ in soft_tags] == [lab for lab, _ in all_tags]  # same order either way
    assert (
        soft.describe()["activation"] == "softmax" and soft.describe()["activation_rule"] == "set by the user"
    )
    d = tagger.describe()
    assert d["labels"] == TAGGER_LABELS and d["activation"] == "sigmoid" and d["fingerprint"]["files"] == 1
    assert d["feature_rule"]["max_length"] == 1024 and d["feature_rule"]["normalise"]["std"] == pytest.approx(
        4.5689974
    )
    # top_k and threshold cut, in order
    (cut,) = tagger.tag([fbank], top_k=3, threshold=scores[1])
    assert cut == all_tags[:2]


def stream_examples(root: str, sets=None) -> list:
    """Every example as the training stream's reader makes it, in the epoch's order; `sets`:
    the index as a run read it when it started (default: now)."""
    sets = sets or open_sets([(root, 1.0)])
    cfg = StreamConfig(micro_batch=4)
    plan = EpochPlan(sets, cfg, 0)
    reader = Reader(sets, cfg, 0)
    try:
        return [reader.example(r) for r in plan.refs(0, plan.examples)]
    finally:
        reader.close()


def stream_keys_and_digest(root: str):
    stream = TrainStream(
        open_sets([(root, 1.0)]), StreamConfig(micro_batch=4), Collator(byte_tokenizer()), 0, 1, 0
    )
    return [b["keys"] for b in StreamLoader(stream)], stream.digest()


def test_gama_ds_tag_adds_and_replaces_tags_without_touching_the_features(
    tmp_path, tagger, tiny_tagger, capsys
):
    root = convert_synth(tmp_path, "set")
    tars, (keys_before, digest_before) = tar_digests(root), stream_keys_and_digest(root)
    assert set(set_tags(root).values()) == {None}  # never tagged
    assert main(["tag", root, "--tagger", tiny_tagger, "--top-k", "3", "--threshold", "0", *QUIET]) == 0

    index = read_index(root)
    provenance = index["provenance"]["tagger"]
    assert (provenance["top_k"], provenance["threshold"], provenance["generation"]) == (3, 0.0, 1)
    assert provenance["fingerprint"] == tagger.fingerprint and provenance["labels"] == TAGGER_LABELS
    tags = set_tags(root)
    samples = [s for e in index["shards"] for s in iter_samples(f"{root}/{e['file']}")]
    direct = tagger.tag([s.fbank for s in samples], top_k=3, threshold=0.0)
    assert [tags[s.key] for s in samples] == [[list(t) for t in c] for c in direct]
    # The training stream's examples carry their clip's tags; what it reads and its resume state
    # are those of the untagged set.
    examples = stream_examples(root)
    assert examples and all(e.tags == tags[e.key.split("/")[-1].split("#")[0]] for e in examples)
    assert stream_keys_and_digest(root) == (keys_before, digest_before)
    assert tar_digests(root) == tars
    problems, _ = verify(root)
    assert problems == []

    # A tagging that stops half-way (here at a truncated last shard, after the first two shards'
    # new tag files are written) leaves the index and the tags in force as they were; its files,
    # named by no index, are ignored, and the next tagging clears them.
    first = sorted(n for n in os.listdir(root) if ".tags." in n)
    index_bytes, last = open(f"{root}/index.json", "rb").read(), f"{root}/shard-000002.tar"
    shard_bytes = open(last, "rb").read()
    open(last, "wb").write(shard_bytes[: len(shard_bytes) // 2])
    capsys.readouterr()
    assert main(["tag", root, "--tagger", tiny_tagger, "--top-k", "2", "--batch-size", "1", *QUIET]) == 2
    assert "shard-000002.tar" in capsys.readouterr().err
    open(last, "wb").write(shard_bytes)
    assert len([n for n in os.listdir(root) if ".tags.2." in n]) == 2  # the stopped run's files
    assert open(f"{root}/index.json", "rb").read() == index_bytes
    assert verify(root)[0] == [] and set_tags(root) == tags

    # Re-tagging replaces: a new generation of files in force, the tars untouched; the files of
    # the tagging it replaced stay, so a run that started on them reads the tags it started with.
    started = open_sets([(root, 1.0)])
    assert main(["tag", root, "--tagger", tiny_tagger, "--top-k", "1", *QUIET]) == 0
    second = sorted(e["tags"]["file"] for e in read_index(root)["shards"])
    assert len(first) == len(second) == 3 and not set(first) & set(second)
    assert sorted(n for n in os.listdir(root) if ".tags." in n) == sorted(first + second)
    assert set_tags(root) == {k: v[:1] for k, v in tags.items()}
    assert tar_digests(root) == tars and verify(root)[0] == []
    old = stream_examples(root, started)
    assert old and all(e.tags == tags[e.key.split("/")[-1].split("#")[0]] for e in old)
    # A tagging after that removes them: that run stops, naming the shard, though bad samples
    # are skipped (dropping a whole shard's examples is no skip); the set itself is whole.
    assert main(["tag", root, "--tagger", tiny_tagger, "--top-k", "1", *QUIET]) == 0
    assert not set(first) & set(os.listdir(root))
    skipping = StreamConfig(micro_batch=4, on_bad_sample="skip")
    reader = Reader(started, skipping, 0)
    with pytest.raises(
        StreamError, match=re.escape(started[0].name) + r": shard-\d{6}\.tar: its tags .* unreadable"
    ):
        reader.example(EpochPlan(started, skipping, 0).refs(0, 1)[0])
    reader.close()
    assert verify(root)[0] == [] and set_tags(root) == {k: v[:1] for k, v in tags.items()}

    # A changed tag file is named by shard, in verify, iter_samples and the stream.
    entry = read_index(root)["shards"][1]
    path = os.path.join(root, entry["tags"]["file"])
    doc = json.load(open(path))
    doc["tags"][0][0][1] = 0.999
    json.dump(doc, open(path, "w"))
    problems, _ = verify(root)
    assert problems and all(entry["file"] in p for p in problems)
    with pytest.raises(ShardError, match=entry["file"]):
        list(iter_samples(os.path.join(root, entry["file"])))
    with pytest.raises(StreamError, match=entry["file"]):
        stream_examples(root)
    # A run without a soft prompt never reads tags: the damaged file does not touch its stream.
    assert stream_keys_and_digest(root) == (keys_before, digest_before)
    # A tag file whose clips are out of line with its shard's (its sha256 in the index, so it
    # reads) ends a run that skips bad samples too: a whole shard would go.
    doc["keys"][0], doc["keys"][1] = doc["keys"][1], doc["keys"][0]
    data = json.dumps(doc).encode()
    open(path, "wb").write(data)
    index = read_index(root)
    index["shards"][1]["tags"]["sha256"] = hashlib.sha256(data).hexdigest()
    write_index(root, index)
    sets, skipping = open_sets([(root, 1.0)]), StreamConfig(micro_batch=4, on_bad_sample="skip")
    reader = Reader(sets, skipping, 0)
    with pytest.raises(StreamError, match=f"{entry['file']}: sample .* is not its tags' #"):
        plan = EpochPlan(sets, skipping, 0)
        [reader.example(r) for r in plan.refs(0, plan.examples)]
    reader.close()


def test_bad_tagging_options_are_one_line_errors_before_anything_loads(tmp_path, tiny_tagger, capsys):
    root = convert_synth(tmp_path, "set")
    capsys.readouterr()
    before = sha256_file(os.path.join(root, "index.json"))
    other = str(tmp_path / "wav2vec2")
    shutil.copytree(tiny_tagger, other)
    with open(os.path.join(other, "preprocessor_config.json"), "w") as f:
        json.dump({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "sampling_rate": 16000}, f)
    cases = [
        (["--top-k", "0"], "--top-k must be a whole number of at least 1, got 0"),
        (["--top-k", "13"], "--top-k 13 is more than the tagger's 12 labels"),
        (["--threshold", "1.5"], "--threshold must be a score in [0, 1], got 1.5"),
        (["--threshold", "nan"], "--threshold must be a score in [0, 1], got nan"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ]
    for flags, message in cases:
        assert main(["tag", root, "--tagger", tiny_tagger, *flags, *QUIET]) == 2
        assert capsys.readouterr().err == f"gama-ds tag: error: {message}\n"
    assert main(["tag", root, "--tagger", str(tmp_path / "nowhere"), *QUIET]) == 2
    assert (
        capsys.readouterr().err == f"gama-ds tag: error: --tagger {tmp_path / 'nowhere'}: not a directory\n"
    )
    assert main(["tag", root, "--tagger", other, *QUIET]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and other in err and "'Wav2Vec2FeatureExtractor', not ASTFeatureExtractor" in err
    )
    assert main(["convert", "x.json", "--out", str(tmp_path / "o"), "--tagger", other, "--no-progress"]) == 2
    assert "'Wav2Vec2FeatureExtractor', not ASTFeatureExtractor" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")  # refused before any work
    assert sha256_file(os.path.join(root, "index.json")) == before
    assert not [n for n in os.listdir(root) if ".tags." in n]


def test_convert_with_a_tagger_gives_the_tags_of_convert_then_tag(tmp_path, tiny_tagger):
    flags = ["--tagger", tiny_tagger, "--top-k", "4", "--threshold", "0.3"]
    at_once = convert_synth(tmp_path, "at_once", *flags)
    after = convert_synth(tmp_path, "after")
    assert main(["tag", after, *flags, *QUIET]) == 0
    assert set_tags(at_once) == set_tags(after) and None not in set_tags(at_once).values()
    assert tar_digests(at_once) == tar_digests(after)
    a, b = (read_index(r)["provenance"]["tagger"] for r in (at_once, after))
    assert a == b and verify(at_once)[0] == []
    # The same command again is a no-op; another top_k re-tags the finished set.
    files = sorted(os.listdir(at_once))
    assert convert_synth(tmp_path, "at_once", *flags) and sorted(os.listdir(at_once)) == files
    convert_synth(tmp_path, "at_once", "--tagger", tiny_tagger, "--top-k", "1")
    assert read_index(at_once)["provenance"]["tagger"]["generation"] == 2
    assert all(len(t) == 1 for t in set_tags(at_once).values())


def test_a_resumed_soft_prompt_run_refuses_shards_tagged_since_by_another_model(tmp_path, tiny_tagger):
    from gama_ds.config import ConfigError, load_recipe
    from gama_ds.train.checkpoint import COMPLETE
    from gama_ds.train.preflight import RUN_FILE, preflight

    root = convert_synth(tmp_path, "set", "--tagger", tiny_tagger)
    out = tmp_path / "run"
    overrides = [f"data.train=[{{path: {root}}}]", f"train.output_dir={out}", "model.soft_prompt={tokens: 1}"]
    recipe = load_recipe("tiny", overrides)
    started = preflight(recipe, 1, None, "h").tagger
    assert started == read_index(root)["provenance"]["tagger"]
    out.mkdir()
    (out / RUN_FILE).write_text(json.dumps({"recipe_hash": "h", "tagger": started}))
    # Re-tagged by another model before the run saved anything: it starts again on those tags.
    other = str(tmp_path / "other_tagger")
    shutil.copytree(tiny_tagger, other)
    config = json.load(open(os.path.join(other, "config.json")))
    config["id2label"]["0"] = "Human speech"  # another label set: another model
    json.dump(config, open(os.path.join(other, "config.json"), "w"))
    assert main(["tag", root, "--tagger", other, *QUIET]) == 0
    assert preflight(recipe, 1, "auto", "h").tagger["path"] == other
    saved = out / "checkpoints" / "step-00000002"  # from here on there is a checkpoint to resume
    saved.mkdir(parents=True)
    (saved / COMPLETE).write_text("")
    # Tagged again by the same model (the tags it started with): it resumes.
    assert main(["tag", root, "--tagger", tiny_tagger, *QUIET]) == 0
    assert preflight(recipe, 1, "auto", "h").tagger["generation"] == 3
    # By another model: refused before anything starts, naming both.
    assert main(["tag", root, "--tagger", other, *QUIET]) == 0
    with pytest.raises(
        ConfigError, match=f"trained on tags from {tiny_tagger}; its shards are now tagged by {other}"
    ):
        preflight(recipe, 1, "auto", "h")
    fresh = load_recipe("tiny", [*overrides, f"train.output_dir={tmp_path / 'new'}"])
    assert preflight(fresh, 1, None, "h").tagger["path"] == other  # a new run may use them
