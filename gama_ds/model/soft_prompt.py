"""GAMA-IT's trainable hint: `tokens` embeddings that take the place of the hint's placeholders.

The collator marks the soft tokens' positions (`hint_mask`, data/soft_prompt.py); the k-th marked
position of a row gets embedding k (mod `tokens`, which only matters for a hint cut short by
`cutoff_len`). A module of its own, called in every forward pass whether or not a batch has hints,
so that ZeRO-3 gathers its weight on every rank alike.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompt(nn.Module):
    def __init__(self, tokens: int, hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        # Zeros until `init_from` (the trainer's stated rule, or an export's tensor): building it
        # draws nothing from the random state, so the rest of the model starts as without it.
        self.weight = nn.Parameter(torch.zeros(tokens, hidden, dtype=dtype))

    @property
    def tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self, hint_mask: torch.Tensor) -> torch.Tensor:
        """hint_mask [B, T] -> [B, T, hidden]: each row's soft embeddings in its hint positions
        (what lands elsewhere is discarded by the caller)."""
        order = (hint_mask.long().cumsum(dim=1) - 1).clamp(min=0) % self.weight.shape[0]
        return nn.functional.embedding(order, self.weight)

    @torch.no_grad()
    def init_from(self, embeddings: torch.Tensor, ids: list[int]) -> None:
        """Soft token k starts as embedding row ids[k] of the LLM (data/soft_prompt.init_ids)."""
        if len(ids) != self.tokens:
            raise ValueError(f"{len(ids)} init ids for {self.tokens} soft tokens")
        rows = embeddings[torch.tensor(ids, device=embeddings.device)]
        self.weight.copy_(rows.to(device=self.weight.device, dtype=self.weight.dtype))
