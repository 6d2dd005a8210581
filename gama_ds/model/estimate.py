"""Parameter counts and a per-GPU memory estimate, from a model built on the meta device.

Model states come from DeepSpeed's own estimators, applied to the trainable parameters
(16-bit weights, 32-bit master weights, Adam moments, gradients), plus the frozen LLM's
16-bit weights, replicated under ZeRO-2 and partitioned under ZeRO-3. Activations use the
usual transformer rule of thumb (Korthikanti et al., 2022: about 34 + 5*heads*seq/hidden
bytes per token and hidden unit per layer in 16-bit; with checkpointing, the layer inputs
plus one layer) for the LLM over audio + text tokens and for the audio encoder when it
trains. It is an estimate for planning a job, not a promise; allocator slack is not in it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .weights import count_parameters

GIB = 2**30


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


def estimate(model, world_size: int, micro_batch: int, text_tokens: int, checkpointing: bool) -> dict:
    if not torch.cuda.is_available():
        # Otherwise DeepSpeed announces its CPU fallback on stdout, which --json output cannot have.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = count_parameters(model)
    total = sum(c["total"] for c in counts.values())
    trainable = sum(c["trainable"] for c in counts.values())
    frozen = total - trainable
    _, zero2 = estimate_zero2_model_states_mem_needs(trainable, world_size, 1, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        trainable, largest_layer(model), world_size, 1, cpu_offload=False, cpu_offload_params=False
    )
    zero2 += 2 * frozen
    zero3 += 2 * frozen / world_size
    acts = activation_bytes(model, micro_batch, text_tokens, checkpointing)
    return {
        "params": counts,
        "total": total,
        "trainable": trainable,
        "memory_gib": {"zero2": round((zero2 + acts) / GIB, 2), "zero3": round((zero3 + acts) / GIB, 2)},
        "activations_gib": round(acts / GIB, 2),
        "world_size": world_size,
        "micro_batch": micro_batch,
        "sequence": model.num_audio_tokens + text_tokens,
    }


def build_on_meta(cfg):
    from .build import build_model

    with torch.device("meta"):
        return build_model(cfg, load_weights=False)
