"""The multi-layer aggregator: two BERT layers over the last encoder layer's 64 tokens.

Each layer is self-attention, then cross-attention to a tapped earlier encoder layer, then
the feed-forward block (reference/gama.md §1.3). The released GAMA code computes the
cross-attention but feeds the self-attention output to the feed-forward block, so its
checkpoints never used the taps. `mode="paper"` follows the paper; `mode="released"`
reproduces the released behaviour exactly and leaves the cross-attention weights out of
the computation (they could never receive a gradient).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

from ..config import ModelConfig, choices

MODES = choices(ModelConfig, "aggregator")


class AggregatorLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        # Stock BERT blocks, named as in the reference, so its weights load by name.
        self.attention = BertAttention(config, is_causal=False)
        self.crossattention = BertAttention(config, is_causal=False, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, tapped: torch.Tensor, mode: str) -> torch.Tensor:
        x, _ = self.attention(x)
        if mode == "paper":
            x, _ = self.crossattention(x, None, tapped)
        return self.output(self.intermediate(x), x)


class Aggregator(nn.Module):
    """Layer 1 attends to the deeper tap, layer 2 to the shallower one, as the reference."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"aggregator must be one of {MODES}, got {mode!r}")
        config = BertConfig(
            hidden_size=width,
            num_attention_heads=heads,
            intermediate_size=ffn,
            hidden_act="gelu",
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            layer_norm_eps=1e-12,
        )
        config._attn_implementation = "sdpa"
        self.mode = mode
        self.layers = nn.ModuleList([AggregatorLayer(config) for _ in range(2)])

    def unused_parameters(self) -> list[str]:
        """Names (relative to this module) that the forward pass never touches."""
        if self.mode == "paper":
            return []
        return [
            f"layers.{i}.crossattention.{n}"
            for i, layer in enumerate(self.layers)
            for n, _ in layer.crossattention.named_parameters()
        ]

    def forward(self, last: torch.Tensor, taps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = last
        for layer, tapped in zip(self.layers, taps, strict=True):
            x = layer(x, tapped, self.mode)
        return x
