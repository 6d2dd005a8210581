"""What a model's size implies, from the model built on the meta device (no weights).

Activations use the usual transformer rule of thumb (Korthikanti et al., 2022: about
34 + 5*heads*seq/hidden bytes per token and hidden unit per layer in 16-bit; with
checkpointing, the layer inputs plus one layer) for the LLM over audio + text tokens and for
the audio encoder when it trains. How ZeRO spreads the model states over the GPUs is the
training side's business (train/memory.py).
"""

from __future__ import annotations

import torch
from torch import nn


def _layer_activation_bytes(tokens: int, hidden: int, heads: int, batch: int) -> float:
    return tokens * batch * hidden * (34 + 5 * heads * tokens / hidden)


def activation_bytes(model, micro_batch: int, text_tokens: int, checkpointing: bool) -> int:
    cfg = model.llm.config
    layers, hidden, heads = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    seq = model.num_audio_tokens + text_tokens
    per_layer = _layer_activation_bytes(seq, hidden, heads, micro_batch)
    if checkpointing:
        llm = layers * 2 * seq * micro_batch * hidden + per_layer
    else:
        llm = layers * per_layer
    logits = micro_batch * text_tokens * cfg.vocab_size * (2 + 4)  # 16-bit logits + fp32 for the loss
    encoder = model.audio.encoder
    audio = 0.0
    if any(p.requires_grad for p in encoder.parameters()):
        depth = len(encoder.blocks_a) + len(encoder.blocks_u)
        width = encoder.norm_a.normalized_shape[0]
        patches = encoder.rows * encoder.cols
        per_block = _layer_activation_bytes(patches, width, encoder.blocks_u[0].attn.heads, micro_batch)
        audio = depth * 2 * patches * micro_batch * width + per_block if checkpointing else depth * per_block
    return int(llm + logits + audio)


def largest_layer(model: nn.Module) -> int:
    """Parameters of the largest single module (ZeRO-3 gathers one at a time)."""
    return max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        default=0,
    )


def build_on_meta(cfg):
    from .build import build_model

    with torch.device("meta"):
        return build_model(cfg, load_weights=False)
