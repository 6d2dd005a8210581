"""The audio Q-Former: learned queries cross-attending to the encoder's 64 tokens.

Built on transformers' `Blip2QFormerModel`, which is the BLIP-2 query path the reference
prunes its LAVIS BERT down to (reference/gama.md §1.4): 12 layers, cross-attention in every
second layer, 32 queries. The reference keeps it in eval mode for the whole run, so it trains
without dropout; here dropout is a config value, 0 by default.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


class AudioQFormer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, ffn: int, num_queries: int, dropout: float):
        super().__init__()
        config = Blip2QFormerConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            hidden_act="gelu",
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            layer_norm_eps=1e-12,
            cross_attention_frequency=2,
            encoder_hidden_size=width,
        )
        config._attn_implementation = "sdpa"
        self.num_queries = num_queries  # an int: under ZeRO-3 the parameter's shape is [0]
        self.input_norm = nn.LayerNorm(width)  # the reference's qformer_proj_norm (BLIP-2's ln_vision)
        self.query_tokens = nn.Parameter(torch.empty(1, num_queries, width).normal_(std=0.02))
        self.bert = Blip2QFormerModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 64, width] encoder tokens -> [B, num_queries, width]."""
        encoder_states = self.input_norm(tokens)
        queries = self.query_tokens.expand(tokens.shape[0], -1, -1)
        return self.bert(query_embeds=queries, encoder_hidden_states=encoder_states).last_hidden_state
