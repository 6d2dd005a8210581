"""The GAMA model on stock transformers and peft: shapes, loss, padding, generation, modes."""

from __future__ import annotations

import copy

import pytest
import torch

from gama_ds.audio import PAD_VALUE
from gama_ds.model.build import build_model, tiny_config
from gama_ds.model.gama import IGNORE, positions, token_losses

VOCAB = 512


def batch(b: int = 2, t: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "fbank": torch.randn(b, 1024, 128, generator=g),
        "input_ids": torch.randint(3, VOCAB, (b, t), generator=g),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config()).eval()


def test_shapes_through_every_module(model):
    b = batch()
    audio = model.audio
    last, *taps = audio.encoder(b["fbank"])
    assert last.shape == (2, 64, 64) and [t.shape for t in taps] == [(2, 64, 64)] * 2
    assert audio.aggregator(last, taps).shape == (2, 64, 64)
    assert audio.qformer(last).shape == (2, 8, 64)
    assert audio(b["fbank"]).shape == (2, 8 + 64, model.llm.config.hidden_size)
    assert model.num_audio_tokens == 72
    out = model(**b, labels=b["input_ids"])
    assert out.logits.shape == (2, 12, VOCAB) and out.loss.ndim == 0


def test_ltu_variant_has_32_tokens_and_one_linear_projection():
    torch.manual_seed(0)
    ltu = build_model(tiny_config(variant="ltu", trainable="all")).eval()
    b = batch()
    assert ltu.audio(b["fbank"]).shape == (2, 32, ltu.llm.config.hidden_size)
    assert [type(m).__name__ for m in ltu.audio.proj] == ["LayerNorm", "Linear"]
    assert ltu(**b).logits.shape == (2, 12, VOCAB)


def test_loss_covers_supervised_text_tokens_only(model):
    b = batch()
    labels = b["input_ids"].clone()
    labels[:, :5] = IGNORE  # an unsupervised prompt
    out = model(**b, labels=labels)
    # The same loss from the full-length LLM output, audio positions included.
    embeds, mask = model._inputs(b["fbank"], b["input_ids"], b["attention_mask"], None)
    full = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)).logits
    n = model.num_audio_tokens
    full_labels = torch.cat([torch.full((2, n), IGNORE), labels], dim=1)
    expected = torch.nn.functional.cross_entropy(
        full[:, :-1].transpose(1, 2), full_labels[:, 1:], ignore_index=IGNORE
    )
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits, full[:, n:])


def test_right_padded_batch_gives_each_sample_its_own_loss(model):
    long, short = batch(1, 12, seed=1), batch(1, 7, seed=2)
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = {
        "fbank": torch.cat([long["fbank"], short["fbank"]]),
        "input_ids": torch.cat([long["input_ids"], torch.cat([short["input_ids"], pad], 1)]),
        "attention_mask": torch.cat([long["attention_mask"], torch.cat([short["attention_mask"], pad], 1)]),
    }
    labels = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, IGNORE)
    together = token_losses(model(**padded).logits, labels)
    for i, alone in enumerate((long, short)):
        own = token_losses(model(**alone).logits, alone["input_ids"])[0]
        torch.testing.assert_close(together[i, : own.numel()], own, rtol=1e-5, atol=1e-5)
    assert (together[1, 6:] == 0).all()


def test_batched_greedy_generation_equals_one_by_one(model):
    prompts = [batch(1, t, seed=s) for t, s in ((9, 3), (4, 4), (6, 5))]
    width = max(p["input_ids"].shape[1] for p in prompts)

    def left_pad(x, value):
        return torch.cat([torch.full((1, width - x.shape[1]), value, dtype=x.dtype), x], dim=1)

    together = model.generate(
        torch.cat([p["fbank"] for p in prompts]),
        torch.cat([left_pad(p["input_ids"], 0) for p in prompts]),
        torch.cat([left_pad(p["attention_mask"], 0) for p in prompts]),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    for i, p in enumerate(prompts):
        alone = model.generate(**p, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert together[i].tolist() == alone[0].tolist()


def test_the_repetition_penalty_covers_the_prompt_tokens_as_the_reference_does(model):
    """The reference's penalty (1.1 in its sampling) divides the logits of every token already in
    the prompt, not only of those generated. The prompt here holds the unpenalised first answer,
    so a huge penalty must change it to the best token that is not in the prompt."""
    b = batch(1, 8, seed=7)

    def first(input_ids, **kw):
        return model.generate(
            b["fbank"], input_ids, b["attention_mask"], max_new_tokens=1, pad_token_id=0, **kw
        )

    ids = b["input_ids"].clone()
    for _ in range(20):  # put the greedy answer into the prompt until it answers with a prompt token
        token = first(ids, do_sample=False)[0, 0]
        if token in ids[0]:
            break
        ids[0, 1] = token
    assert token in ids[0]
    logits = model(b["fbank"], ids, b["attention_mask"]).logits[0, -1]
    logits[ids[0].unique()] = -float("inf")  # what a huge penalty leaves
    penalised = first(ids, do_sample=False, repetition_penalty=1e9)[0, 0]
    assert penalised.item() == logits.argmax().item() != token.item()


@pytest.mark.parametrize(
    "mode",
    [dict(do_sample=False), dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=5)],
    ids=["greedy", "beam", "sample"],
)
def test_every_decoding_mode_sees_the_audio(model, mode):
    """The reference passes audio only when sampling; here every mode must depend on it."""
    b = batch(2, 6)

    def first_step_logits(fbank):
        torch.manual_seed(0)
        out = model.generate(
            fbank,
            b["input_ids"],
            b["attention_mask"],
            max_new_tokens=3,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **mode,
        )
        return out.logits[0]

    same = first_step_logits(b["fbank"])
    torch.testing.assert_close(same, first_step_logits(b["fbank"]))
    assert not torch.allclose(same, first_step_logits(b["fbank"].flip(1)))  # the same frames, reversed


def test_released_mode_ignores_the_taps_and_paper_mode_uses_them():
    b = batch()
    for mode, should_change in (("released", False), ("paper", True)):
        torch.manual_seed(0)
        m = build_model(tiny_config(aggregator=mode)).eval()
        before = m.audio(b["fbank"])
        with torch.no_grad():  # the tap norms act only on the tapped layers
            m.audio.encoder.norm_j.weight.mul_(3.0)
            m.audio.encoder.norm_k.bias.add_(1.0)
        changed = not torch.allclose(before, m.audio(b["fbank"]))
        assert changed == should_change, mode


def test_samples_without_audio_run_the_audio_modules_but_ignore_them(model):
    b = batch()
    has_audio = torch.tensor([True, False])
    calls = []
    hook = model.audio.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        first = model(**b, has_audio=has_audio)
        other_audio = dict(b, fbank=torch.full_like(b["fbank"], PAD_VALUE))
        second = model(**other_audio, has_audio=has_audio)
    finally:
        hook.remove()
    assert calls == [2, 2]  # every sample went through the audio modules
    torch.testing.assert_close(first.logits[1], second.logits[1])  # masked prefix: no influence
    assert not torch.allclose(first.logits[0], second.logits[0])


def test_a_batch_without_any_audio_trains_with_finite_gradients():
    torch.manual_seed(0)
    m = build_model(tiny_config())
    b = batch()
    out = m(**b, labels=b["input_ids"], has_audio=torch.tensor([False, False]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in m.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients():
    """In train mode (checkpointing is off in eval), with dropout off so runs can match."""
    b = batch()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = tiny_config(gradient_checkpointing=checkpointing)
        cfg.audio.aggregator_dropout = 0.0
        m = build_model(cfg).train()
        loss = m(**b, labels=b["input_ids"]).loss
        loss.backward()
        assert m.audio.encoder.gradient_checkpointing == checkpointing
        assert m.llm.is_gradient_checkpointing == checkpointing
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        )
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and any(".lora_A." in n for n in grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fresh_modules_start_as_the_reference_initialises_them():
    m = build_model(tiny_config())
    for module in (m.audio.aggregator, m.audio.proj_qformer, m.audio.proj_aggregator):
        for lin in (x for x in module.modules() if isinstance(x, torch.nn.Linear)):
            assert (lin.bias == 0).all() and abs(lin.weight.std().item() - 0.02) < 0.004


def test_attention_choice_on_this_machine():
    from gama_ds.model.llm import choose_attention, flash_attention_usable

    if flash_attention_usable():
        pytest.skip("this test describes a machine without flash-attn")
    assert choose_attention("auto", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="needs flash-attn"):
        choose_attention("flash_attention_2", torch.bfloat16)


def test_dropout_settings_reach_the_modules():
    m = build_model(tiny_config())
    assert m.audio.qformer.bert.config.hidden_dropout_prob == 0.0
    assert m.audio.aggregator.layers[0].output.dropout.p == pytest.approx(0.1)
    cfg = copy.deepcopy(tiny_config())
    cfg.audio.qformer_dropout = 0.2
    assert build_model(cfg).audio.qformer.bert.config.attention_probs_dropout_prob == pytest.approx(0.2)
