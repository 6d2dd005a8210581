"""Per-GPU memory of a training job under ZeRO-2 and ZeRO-3, for planning (`gama-ds estimate`).

Model states come from DeepSpeed's own estimators, applied to the trainable parameters
(16-bit weights, 32-bit master weights, Adam moments, gradients), plus the frozen LLM's
16-bit weights, replicated under ZeRO-2 and partitioned under ZeRO-3; activations are the
model's (model/estimate.py). An estimate for planning a job, not a promise; allocator slack
is not in it.
"""

from __future__ import annotations

import os

import torch

from ..model.estimate import activation_bytes, largest_layer
from ..model.weights import count_parameters

GIB = 2**30


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
