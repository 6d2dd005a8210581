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
from .data.collate import IGNORE, Collator, Example, prompt_text

# The reference's batch inference settings (gama_inf.py).
REFERENCE_SAMPLING = dict(do_sample=True, temperature=0.1, top_p=0.95, top_k=500, repetition_penalty=1.1)


def generate(
    model,
    tokenizer,
    clips: list,
    qas: list[dict],
    template: str = "alpaca_short",
    batch_size: int = 8,
    max_new_tokens: int = 400,
    **generate_kwargs,
) -> list[str]:
    """One answer per (clip, qa). A clip is a path, encoded bytes, an unpadded fbank array,
    or None for a text-only question."""
    settings = dict(REFERENCE_SAMPLING) if not generate_kwargs else {}
    settings.update(generate_kwargs, max_new_tokens=max_new_tokens)
    answers: list[str] = []
    for start in range(0, len(qas), batch_size):
        chunk = list(zip(clips[start : start + batch_size], qas[start : start + batch_size], strict=True))
        fbank = torch.stack([_padded(c) for c, _ in chunk])
        has_audio = torch.tensor([c is not None for c, _ in chunk])
        enc = tokenizer(
            [prompt_text(qa, template) for _, qa in chunk],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        out = model.generate(
            fbank,
            enc["input_ids"],
            enc["attention_mask"],
            has_audio,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **settings,
        )
        answers += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return answers


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


def evaluate(
    model,
    tokenizer,
    shard_dirs: list[str],
    cutoff_len: int,
    template: str,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    generate_answers: bool = True,
) -> dict:
    """Held-out loss and perplexity over every QA pair; exact-match accuracy of greedy answers."""
    from .data.shards import iter_samples, read_index

    collator = Collator(tokenizer, cutoff_len, template)
    examples = []
    for root in shard_dirs:
        for entry in read_index(root)["shards"]:
            for sample in iter_samples(f"{root}/{entry['file']}"):
                examples += [(sample.fbank, qa) for qa in sample.meta["qa"]]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = [Example(str(i), f, qa) for i, (f, qa) in enumerate(examples[start : start + batch_size])]
            b = collator(chunk)
            loss = model(b["fbank"], b["input_ids"], b["attention_mask"], b["labels"], b["has_audio"]).loss
            n = int((b["labels"][:, 1:] != IGNORE).sum())
            total, count = total + loss.item() * n, count + n
    result = {"examples": len(examples), "loss": total / max(count, 1)}
    result["perplexity"] = math.exp(result["loss"])
    if generate_answers:
        predictions = generate(
            model,
            tokenizer,
            [f for f, _ in examples],
            [qa for _, qa in examples],
            template,
            batch_size,
            max_new_tokens,
            do_sample=False,
        )
        result["exact_match"] = exact_match(predictions, [qa["output"] for _, qa in examples])
        by_task: dict[str, list] = {}
        for (_, qa), p in zip(examples, predictions, strict=True):
            by_task.setdefault(qa.get("task") or "-", []).append(normalise(p) == normalise(qa["output"]))
        result["exact_match_by_task"] = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
    return result
