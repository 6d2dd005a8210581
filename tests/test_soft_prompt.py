"""GAMA-IT's soft prompt in one process: the tags sentence in the prompt token for token (the tiny
byte tokenizer and the real SmolLM2 BPE one), its settings checked, the soft embeddings trained
while the frozen parts stay, and left-padded generation seeing what training saw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gama_ds.config import ConfigError, SoftPromptConfig, load_recipe
from gama_ds.data.collate import IGNORE, Collator, Example
from gama_ds.data.soft_prompt import PLACEHOLDER, init_ids
from gama_ds.data.tokenizer import load_tokenizer
from gama_ds.errors import GamaDsError
from gama_ds.infer import prompt_batch
from gama_ds.model.build import build_model

SOFT = SoftPromptConfig(tokens=3, top_k=2, threshold=0.2)
# Stored tags: score-descending, as a tagger writes them; an AudioSet name with commas in it.
TAGS = [["Vehicle horn, car horn, honking", 0.9], ["Speech", 0.5], ["Music", 0.3], ["Dog", 0.1]]
QA = {"instruction": "What happens?", "input": "", "output": "A car honks."}
# The documented prompt, written out: the sentence is the Input section, the two kept tags
# (top_k 2) joined by "; ", no scores; the soft tokens go where <hint> stands.
BEFORE = "### Instruction:\nWhat happens?\n\n### Input:\nAccording to "
AFTER = (
    ", you are allowed to use or partially use the following tags: Vehicle horn, car horn, honking; "
    "Speech\n\n### Response:\n"
)
FBANK = np.zeros((50, 128), dtype=np.float16)


@pytest.fixture(scope="module", params=["bytes", "smollm2"])
def tokenizer(request):
    if request.param == "bytes":
        return load_tokenizer("bytes")
    return load_tokenizer(request.getfixturevalue("real_llm"))


def test_the_tags_sentence_sits_in_the_prompt_exactly_as_documented(tokenizer):
    tok = tokenizer
    collate = Collator(tok, cutoff_len=400, soft_prompt=SOFT)
    ids, labels = collate.tokenize(QA, TAGS, has_audio=True)
    # The text before the hint with the tokenizer's own start, the soft tokens, then the rest
    # tokenised on its own: no merge can reach across the hint.
    head = tok(BEFORE)["input_ids"]
    tail = tok(AFTER + QA["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == head + [PLACEHOLDER] * 3 + tail
    assert tok.decode(head, skip_special_tokens=True) == BEFORE
    assert tok.decode(tail, skip_special_tokens=True) == AFTER + QA["output"]
    assert labels == head + [IGNORE] * 3 + tail  # the soft tokens are never targets

    batch = collate([Example("k", FBANK, QA, tags=TAGS), Example("t", None, QA)])
    hint = batch["hint_mask"]
    assert hint[0].nonzero().flatten().tolist() == [len(head), len(head) + 1, len(head) + 2]
    assert not hint[1].any()  # a text-only question has no tags and no sentence
    assert (batch["input_ids"][0, hint[0]] == tok.pad_token_id).all()  # a real id, replaced by the model
    assert tok.decode(batch["input_ids"][1][batch["attention_mask"][1] == 1], skip_special_tokens=True) == (
        "### Instruction:\nWhat happens?\n\n### Response:\nA car honks."
    )
    # Inference builds the same prompt, left-padded, with the hint in the same place from the end.
    _, prompt_ids, mask, _, prompt_hint = prompt_batch(
        tok, [FBANK, None], [QA, QA], "alpaca_short", SOFT, [TAGS, None]
    )
    prompt = collate.encode(collate.prompt(QA, TAGS))
    assert prompt == head + [PLACEHOLDER] * 3 + tok(AFTER, add_special_tokens=False)["input_ids"]
    row = prompt_ids[0][mask[0] == 1].tolist()
    assert row[len(head) + 3 :] == prompt[len(head) + 3 :] and row[: len(head)] == head
    assert prompt_hint[0][mask[0] == 1].nonzero().flatten().tolist() == [
        len(head),
        len(head) + 1,
        len(head) + 2,
    ]


def test_clips_without_a_tag_above_the_threshold_and_untagged_clips(tokenizer):
    tok = tokenizer
    text = lambda ids: tok.decode([i for i in ids if i != PLACEHOLDER], skip_special_tokens=True)  # noqa: E731
    low = [["Dog", 0.1]]  # tagged, but nothing reaches the threshold 0.2
    ids, _ = Collator(tok, 400, soft_prompt=SOFT).tokenize(QA, low)
    assert "following tags: none\n\n### Response:" in text(ids) and ids.count(PLACEHOLDER) == 3
    omit = SoftPromptConfig(tokens=3, threshold=0.2, no_tags=None)
    ids, _ = Collator(tok, 400, soft_prompt=omit).tokenize(QA, [])
    assert PLACEHOLDER not in ids and "### Input:" not in text(ids)
    own = {**QA, "input": "Recorded in a street."}  # a QA pair's own input follows the sentence
    ids, _ = Collator(tok, 400, soft_prompt=SOFT).tokenize(own, TAGS)
    assert "tags: Vehicle horn, car horn, honking; Speech\nRecorded in a street.\n\n### Response:" in text(
        ids
    )
    with pytest.raises(GamaDsError, match=r"train/shard-000000.tar/clip_3#0: no tags.*gama-ds tag"):
        Collator(tok, 400, soft_prompt=SOFT).length(Example("train/shard-000000.tar/clip_3#0", FBANK, QA))


def test_the_soft_prompt_settings_are_checked_naming_the_key():
    load_recipe("tiny", ["model.soft_prompt={tokens: 4}"])  # the defaults are valid
    cases = [
        ("model.soft_prompt={tokens: 0}", "model.soft_prompt.tokens must be at least 1"),
        ("model.soft_prompt={template: 'tags: {tags}'}", r"model.soft_prompt.template must hold <hint>"),
        ("model.soft_prompt={template: 'By <hint>.'}", r"model.soft_prompt.template must hold \{tags\}"),
        ("model.soft_prompt={top_k: 0}", "model.soft_prompt.top_k must be at least 1"),
        (
            "model.soft_prompt={threshold: 1.5}",
            r"model.soft_prompt.threshold is a tag score, within \[0, 1\]",
        ),
        ("model.soft_prompt={no_tags: ' '}", "model.soft_prompt.no_tags must be a word"),
        ("model.soft_prompt={size: 3}", "unknown key model.soft_prompt.size"),
        ("optim.group_lr={soft_prompt: 0}", "optim.group_lr.soft_prompt must be positive"),
    ]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_recipe("tiny", [override])


def test_the_soft_embeddings_learn_while_the_frozen_parts_stay():
    recipe = load_recipe("tiny", ["model.soft_prompt={tokens: 3}", "model.trainable=proj"])
    tok = load_tokenizer("bytes")
    torch.manual_seed(0)
    model = build_model(recipe.model)
    soft = recipe.model.soft_prompt
    start = init_ids(tok, soft)  # "the audio tagger": its first three tokens (bytes: "t", "h", "e")
    assert start == tok("the", add_special_tokens=False)["input_ids"]
    model.soft_prompt.init_from(model.llm.get_input_embeddings().weight, start)
    torch.testing.assert_close(model.soft_prompt.weight, model.llm.get_input_embeddings().weight[start])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "soft_prompt.weight" in trainable and not any(n.startswith("audio.encoder.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = Collator(tok, 200, soft_prompt=soft)(
        [Example("a", FBANK, QA, tags=TAGS), Example("b", FBANK, {**QA, "output": "Quiet."}, tags=[])]
    )
    inputs = {
        k: batch[k] for k in ("fbank", "input_ids", "attention_mask", "labels", "has_audio", "hint_mask")
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        assert model.soft_prompt.weight.grad.abs().sum(dim=1).gt(0).all()  # each soft token gets a gradient
        optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name in trainable), name
    # The soft embeddings are what the model reads at the hint, whatever id sits there.
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        other = dict(inputs, input_ids=inputs["input_ids"].masked_fill(inputs["hint_mask"], 7))
        torch.testing.assert_close(model(**other).logits, logits)
        model.soft_prompt.weight.add_(1.0)
        assert (model(**inputs).logits - logits).abs().max() > 1e-3
