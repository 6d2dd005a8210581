"""Generation and evaluation with an exported model.

The same audio front end as conversion (gama_ds.audio), the same prompt template as training,
left-padded batches (GamaModel.generate handles masks and positions), and the reference's
sampling settings by default (reference/gama.md §4).
"""

from __future__ import annotations

import math
import re

import torch

from . import audio
from .data.collate import IGNORE, Collator, Example, ensure_pad_token, prompt_text
from .data.soft_prompt import PLACEHOLDER
from .errors import UsageError
from .evaluate.classify import cosine_scores, top1
from .evaluate.embed import TextEmbedder  # noqa: F401  (re-exported: `gama-ds eval --embedder`)

# The reference's batch inference settings (gama_inf.py).
REFERENCE_SAMPLING = dict(do_sample=True, temperature=0.1, top_p=0.95, top_k=500, repetition_penalty=1.1)
REFERENCE_GENERATION = {**REFERENCE_SAMPLING, "max_new_tokens": 400}


def export_generation(info: dict, where: str = "gama_ds.json") -> dict:
    """The generation settings an export carries (`generation` in its gama_ds.json, as
    `gama-ds import` writes the reference's), else the reference's; each value checked."""
    settings = info.get("generation")
    if settings is None:
        return dict(REFERENCE_GENERATION)
    unknown = set(settings) - set(REFERENCE_GENERATION)
    if unknown:
        raise UsageError(f"{where}: generation.{sorted(unknown)[0]} is not a generation setting")
    checks = {
        "do_sample": lambda v: isinstance(v, bool),
        "temperature": lambda v: _number(v) and v > 0,
        "top_p": lambda v: _number(v) and 0 < v <= 1,
        "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "repetition_penalty": lambda v: _number(v) and v > 0,
        "max_new_tokens": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    }
    for key, value in settings.items():
        if not checks[key](value):
            raise UsageError(f"{where}: generation.{key} = {value!r} is out of range")
    return {**REFERENCE_GENERATION, **settings}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def generate(
    model,
    tokenizer,
    clips: list,
    qas: list[dict],
    template: str = "alpaca_short",
    batch_size: int = 8,
    max_new_tokens: int = 400,
    soft_prompt=None,
    tags: list | None = None,
    **generate_kwargs,
) -> list[str]:
    """One answer per (clip, qa). A clip is a path, encoded bytes, an unpadded fbank array,
    or None for a text-only question. With a soft prompt (an export's model.soft_prompt), `tags`
    holds each clip's tags (data/soft_prompt.py), as training put them in the prompt."""
    if getattr(model, "soft_prompt", None) is not None and soft_prompt is None:
        # Without the sentence its prompts were trained with, such a model answers another task.
        raise UsageError(
            "the model has a soft prompt: give its settings (the export's model.soft_prompt) and tags"
        )
    settings = dict(REFERENCE_SAMPLING) if not generate_kwargs else {}
    settings.update(generate_kwargs, max_new_tokens=max_new_tokens)
    ensure_pad_token(tokenizer)  # a Llama tokenizer has none; padding is masked
    tags = [None] * len(qas) if tags is None else tags
    answers: list[str] = []
    for start in range(0, len(qas), batch_size):
        part = slice(start, start + batch_size)
        fbank, input_ids, attention_mask, has_audio, hint_mask = prompt_batch(
            tokenizer, clips[part], qas[part], template, soft_prompt, tags[part]
        )
        out = model.generate(
            fbank,
            input_ids,
            attention_mask,
            has_audio,
            hint_mask,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **settings,
        )
        answers += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return answers


def prompt_batch(tokenizer, clips: list, qas: list[dict], template: str, soft_prompt=None, tags=None):
    """(fbank, input_ids, attention_mask, has_audio, hint_mask) of one batch for
    GamaModel.generate: padded features, left-padded prompts. `gama-ds serve` builds its
    batches with it too. With a soft prompt, each clip's `tags` go into its prompt."""
    if len(clips) != len(qas):
        raise ValueError(f"{len(clips)} clips for {len(qas)} questions")
    fbank = torch.stack([_padded(c) for c in clips])
    has_audio = torch.tensor([c is not None for c in clips])
    if soft_prompt is None:
        enc = tokenizer(
            [prompt_text(qa, template) for qa in qas],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        return fbank, enc["input_ids"], enc["attention_mask"], has_audio, None
    # The training collator's own tokenisation of the prompt, so the hint sits as it did there.
    collator = Collator(tokenizer, cutoff_len=10**9, template=template, soft_prompt=soft_prompt)
    tags = [None] * len(qas) if tags is None else tags
    rows = [
        collator.encode(collator.prompt(qa, t, c is not None, f"question {i}"))
        for i, (qa, t, c) in enumerate(zip(qas, tags, clips, strict=True))
    ]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    hint_mask = input_ids == PLACEHOLDER
    input_ids[hint_mask] = tokenizer.pad_token_id
    return fbank, input_ids, attention_mask, has_audio, hint_mask


def tag_clips(tagger, clips: list, soft_prompt) -> tuple[list, list]:
    """(features, tags) of clips for a model with a soft prompt: files and bytes decoded once,
    the tagger run on the same features the model gets, at the soft prompt's top_k and
    threshold; a text-only clip (None) has neither."""
    feats = [c if c is None or not isinstance(c, (str, bytes)) else audio.load_features(c)[0] for c in clips]
    present = [f for f in feats if f is not None]
    found = iter(tagger.tag(present, soft_prompt.top_k, soft_prompt.threshold) if present else [])
    tags = [None if f is None else [[label, score] for label, score in next(found)] for f in feats]
    return feats, tags


def _padded(clip) -> torch.Tensor:
    if clip is None:
        return torch.full((audio.TARGET_FRAMES, audio.NUM_MEL_BINS), audio.PAD_VALUE)
    if isinstance(clip, (str, bytes)):
        clip, _ = audio.load_features(clip)
    return audio.pad_features(torch.as_tensor(clip, dtype=torch.float32))


def normalise(text: str) -> str:
    """Lower case, punctuation and extra spaces removed: how exact match compares answers."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    return sum(normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True)) / len(
        references
    )


def classify_by_string(prediction: str, labels: list[str]) -> str | None:
    """The label the prediction names: equal after normalising, else the longest label it
    contains as whole words; None when it names none."""
    text = normalise(prediction)
    names = {normalise(label): label for label in labels}
    if text in names:
        return names[text]
    padded = f" {text} "
    found = [n for n in names if f" {n} " in padded]
    return names[max(found, key=len)] if found else None


def classify_by_embedding(predictions: list[str], labels: list[str], embedder) -> list[str]:
    """LTU's retrieval protocol: "sound of <text>" for both sides, the label of highest cosine."""
    labels = list(labels)
    scores = cosine_scores(
        embedder([f"sound of {p}" for p in predictions]), embedder([f"sound of {x}" for x in labels]), False
    )
    return [labels[i] for i in top1(scores).tolist()]


def classification_accuracy(
    predictions: list[str],
    references: list[str],
    tasks: list[str],
    embedder=None,
    labels: list[str] | None = None,
) -> dict:
    """Single-label accuracy per task. The label set is `labels`, else each task's distinct
    references; a prediction is matched to it by `embedder`, else by string."""
    by_task: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        by_task.setdefault(task, []).append(i)
    result = {}
    for task, idx in sorted(by_task.items()):
        task_labels = sorted(set(labels) if labels else {references[i] for i in idx})
        preds = [predictions[i] for i in idx]
        if embedder is not None:
            chosen = classify_by_embedding(preds, task_labels, embedder)
        else:
            chosen = [classify_by_string(p, task_labels) for p in preds]
        refs = [normalise(references[i]) for i in idx]
        hits = sum(c is not None and normalise(c) == r for c, r in zip(chosen, refs, strict=True))
        result[task] = hits / len(idx)
    return result


METRICS = ("loss", "exact", "classify")


def evaluate(
    model,
    tokenizer,
    shard_dirs: list[str],
    cutoff_len: int,
    template: str,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    metrics: tuple[str, ...] = ("loss", "exact"),
    train_on_inputs: bool = True,
    embedder=None,
    labels: list[str] | None = None,
    soft_prompt=None,
) -> dict:
    """Over every QA pair of the shard sets: `loss` (held-out loss and perplexity over the
    tokens training supervised), and of greedy answers `exact` (exact match, overall and per
    task) and `classify` (accuracy per task against a label set, see classification_accuracy);
    a few answers as samples. With a soft prompt, the clips' stored tags go into the prompts."""
    from .data.shards import iter_samples, read_index

    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise UsageError(f"unknown metric {sorted(unknown)[0]!r}; metrics: {', '.join(METRICS)}")
    examples = []
    for root in shard_dirs:
        for entry in read_index(root)["shards"]:
            for sample in iter_samples(f"{root}/{entry['file']}"):
                tags, where = sample.meta.get("tags"), f"{root}/{entry['file']}: sample {sample.key!r}"
                examples += [Example(where, sample.fbank, qa, tags=tags) for qa in sample.meta["qa"]]
    result: dict = {"examples": len(examples)}
    if "loss" in metrics:
        collator = Collator(tokenizer, cutoff_len, template, train_on_inputs, soft_prompt=soft_prompt)
        result["loss"] = _loss(model, collator, examples, batch_size)
        result["perplexity"] = math.exp(result["loss"])
    if "exact" not in metrics and "classify" not in metrics:
        return result
    qas = [e.qa for e in examples]
    references = [qa["output"] for qa in qas]
    tasks = [qa.get("task") or "-" for qa in qas]
    fbanks, tags = [e.fbank for e in examples], [e.tags for e in examples]
    if soft_prompt is not None:
        missing = [e.key for e in examples if e.tags is None]
        if missing:
            raise UsageError(
                f"{missing[0]}: no tags, and the model has a soft prompt: gama-ds tag its shards"
            )
    predictions = generate(
        model,
        tokenizer,
        fbanks,
        qas,
        template,
        batch_size,
        max_new_tokens,
        soft_prompt,
        tags,
        do_sample=False,
    )
    if "exact" in metrics:
        result["exact_match"] = exact_match(predictions, references)
        hits: dict[str, list[bool]] = {}
        for p, r, t in zip(predictions, references, tasks, strict=True):
            hits.setdefault(t, []).append(normalise(p) == normalise(r))
        result["exact_match_by_task"] = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    if "classify" in metrics:
        result["classify_by"] = "embedding" if embedder is not None else "string"
        result["classify_by_task"] = classification_accuracy(predictions, references, tasks, embedder, labels)
    step = max(1, len(examples) // 6)
    result["samples"] = [
        {"question": qa["instruction"], "answer": p, "reference": qa["output"]}
        for qa, p in list(zip(qas, predictions, strict=True))[::step][:6]
    ]
    return result


def _loss(model, collator: Collator, examples: list[Example], batch_size: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            b = collator(examples[start : start + batch_size])
            inputs = (
                b["fbank"],
                b["input_ids"],
                b["attention_mask"],
                b["labels"],
                b["has_audio"],
                b["hint_mask"],
            )
            loss = model(*inputs).loss
            n = int((b["labels"][:, 1:] != IGNORE).sum())
            total, count = total + loss.item() * n, count + n
    return total / max(count, 1)
