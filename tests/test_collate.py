"""The collator: the reference's template, truncation, EOS rule, labels, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gama_ds.audio import PAD_VALUE
from gama_ds.data.collate import IGNORE, Collator, Example, ensure_pad_token, prompt_text
from gama_ds.data.tokenizer import byte_tokenizer

QA = {"instruction": "How many beeps?", "input": "", "output": "four", "dataset": "", "task": ""}


def test_alpaca_short_template_exactly_as_the_reference():
    assert prompt_text(QA) == "### Instruction:\nHow many beeps?\n\n### Response:\n"
    with_input = dict(QA, input="a kitchen")
    assert (
        prompt_text(with_input)
        == "### Instruction:\nHow many beeps?\n\n### Input:\na kitchen\n\n### Response:\n"
    )


def test_labels_supervise_everything_or_only_the_answer():
    tok = byte_tokenizer()
    full = "### Instruction:\nHow many beeps?\n\n### Response:\nfour"
    ids, labels = Collator(tok, cutoff_len=108).tokenize(QA)
    assert ids == tok(full)["input_ids"] + [tok.eos_token_id] and ids[0] == tok.bos_token_id
    assert labels == ids  # train_on_inputs: the prompt is supervised, as in the reference
    ids2, labels2 = Collator(tok, cutoff_len=108, train_on_inputs=False).tokenize(QA)
    n_prompt = len(tok(prompt_text(QA))["input_ids"])
    assert ids2 == ids and labels2 == [IGNORE] * n_prompt + ids[n_prompt:]
    assert tok.decode([t for t in labels2 if t != IGNORE]) == "four</s>"


def test_truncation_at_cutoff_drops_the_eos_like_the_reference():
    tok = byte_tokenizer()
    ids, _ = Collator(tok, cutoff_len=20).tokenize(QA)
    assert len(ids) == 20 and ids[-1] != tok.eos_token_id
    exact = len(tok(prompt_text(QA) + QA["output"])["input_ids"])
    ids, _ = Collator(tok, cutoff_len=exact).tokenize(QA)  # fits exactly: no room for EOS
    assert len(ids) == exact and ids[-1] != tok.eos_token_id
    ids, _ = Collator(tok, cutoff_len=exact + 1).tokenize(QA)
    assert ids[-1] == tok.eos_token_id


def test_a_batch_is_right_padded_with_masks_labels_and_padded_fbank():
    tok = byte_tokenizer()
    collate = Collator(tok, cutoff_len=108)
    short = Example("a#0", np.ones((5, 128), np.float16), QA)
    long = Example("b#0", np.zeros((1024, 128), np.float16), dict(QA, output="four beeps, evenly spaced"))
    silent = Example("c#0", None, QA)
    batch = collate([short, long, silent])
    n_short, n_long = (len(collate.tokenize(e.qa)[0]) for e in (short, long))
    assert batch["input_ids"].shape == (3, n_long) and batch["fbank"].shape == (3, 1024, 128)
    assert batch["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert (batch["labels"][0, n_short:] == IGNORE).all() and (
        batch["input_ids"][0, n_short:] == tok.pad_token_id
    ).all()
    assert (batch["fbank"][0, :5] == 1).all() and (batch["fbank"][0, 5:] == np.float32(PAD_VALUE)).all()
    assert (batch["fbank"][2] == np.float32(PAD_VALUE)).all()
    assert batch["has_audio"].tolist() == [True, True, False]
    assert int(batch["text_tokens"]) == 2 * n_short + n_long
    assert float(batch["pad_fraction"]) == pytest.approx(2 * (n_long - n_short) / (3 * n_long))


def test_padding_with_eos_never_hides_a_real_eos_from_the_loss():
    tok = byte_tokenizer()
    tok.pad_token = None
    tok.unk_token = None
    ensure_pad_token(tok)
    assert tok.pad_token_id == tok.eos_token_id  # the reference's training choice
    batch = Collator(tok, cutoff_len=108)(
        [Example("a#0", None, QA), Example("b#0", None, dict(QA, output="x"))]
    )
    n = int(batch["attention_mask"][0].sum())
    assert batch["labels"][0, n - 1] == tok.eos_token_id  # the real EOS stays a target
    assert torch.equal(batch["labels"] == IGNORE, batch["attention_mask"] == 0)


def test_prompt_masking_with_an_input_block_and_truncation_inside_the_prompt():
    tok = byte_tokenizer()
    qa = dict(QA, input="recorded in a kitchen")
    n_prompt = len(tok(prompt_text(qa))["input_ids"])
    ids, labels = Collator(tok, cutoff_len=108, train_on_inputs=False).tokenize(qa)
    assert "### Input:\nrecorded in a kitchen" in tok.decode(ids)
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    short, short_labels = Collator(tok, cutoff_len=n_prompt - 5, train_on_inputs=False).tokenize(qa)
    assert len(short) == n_prompt - 5 and short_labels == [IGNORE] * len(short)  # nothing left to learn
