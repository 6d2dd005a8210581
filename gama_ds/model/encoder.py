"""The CAV-MAE audio branch: ViT blocks over 16x16 patches of the [1024, 128] fbank.

Shapes follow reference/gama.md §1.2: the fbank is laid out as a [128 mel, 1024 frame]
image, cut into 8 x 64 patches of 16x16 (512 tokens, 768 wide), given a trainable 2-D
sin-cos position embedding and a modality token, and run through the modality-specific
blocks (`blocks_a`), the shared block (`blocks_u`) and a final norm. Two intermediate
outputs (after `blocks_a[8]` and `blocks_a[4]` in the 12-layer model) are tapped, each with
its own norm, for the aggregator. Every output is mean-pooled over the 8 frequency rows to
64 time tokens and divided by 50, as the reference does before anything downstream.
Parameter names match the reference's `audio_encoder.*` so its weights load by name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PATCH = 16
FREQ_BINS = 128
FRAMES = 1024
OUTPUT_SCALE = 50.0  # the reference divides every encoder output by 50


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm ViT block (timm's, no dropout). CAV-MAE gives each block three norm pairs
    (joint, audio, video); the audio branch uses the joint pair in `blocks_a` and the audio
    pair in `blocks_u`, so only the pair a block uses is built here."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, norms: str):
        super().__init__()
        self.norms = norms
        setattr(self, f"norm1{norms}", nn.LayerNorm(dim))
        self.attn = Attention(dim, heads)
        setattr(self, f"norm2{norms}", nn.LayerNorm(dim))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(getattr(self, f"norm1{self.norms}")(x))
        return x + self.mlp(getattr(self, f"norm2{self.norms}")(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        # [B, frames, mel] -> [B, 1, mel, frames] -> [B, dim, 8, 64] -> [B, 512, dim]
        x = fbank.unsqueeze(1).transpose(2, 3)
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """MAE's 2-D sin-cos table, [rows * cols, dim]: the first half of the channels encodes
    the column (time), the second half the row (frequency), as CAV-MAE's initialisation."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    return np.concatenate([one_axis(dim // 2, grid_w), one_axis(dim // 2, grid_h)], axis=1)


class AudioEncoder(nn.Module):
    def __init__(self, dim: int = 768, heads: int = 12, depth: int = 12, taps=(8, 4), mlp_ratio: float = 4.0):
        super().__init__()
        if depth < 2:
            raise ValueError(f"encoder depth must be at least 2 (modality blocks + 1 shared), got {depth}")
        if not all(0 <= t < depth - 1 for t in taps):
            raise ValueError(f"encoder taps {list(taps)} must index the {depth - 1} modality blocks")
        self.rows, self.cols = FREQ_BINS // PATCH, FRAMES // PATCH
        self.taps = tuple(taps)
        self.patch_embed_a = PatchEmbed(dim)
        self.pos_embed_a = nn.Parameter(torch.from_numpy(sincos_2d(dim, self.rows, self.cols)).float()[None])
        self.modality_a = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks_a = nn.ModuleList([Block(dim, heads, mlp_ratio, "") for _ in range(depth - 1)])
        self.blocks_u = nn.ModuleList([Block(dim, heads, mlp_ratio, "_a")])
        self.norm_a = nn.LayerNorm(dim)
        self.norm_j = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """CAV-MAE's initialisation: xavier-uniform linears and patch conv, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed_a.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.modality_a, std=0.02)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 512, dim] -> mean over the 8 frequency rows -> [B, 64, dim], / 50."""
        return x.reshape(x.shape[0], self.rows, self.cols, x.shape[-1]).mean(dim=1) / OUTPUT_SCALE

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, fbank: torch.Tensor, with_taps: bool = True) -> tuple[torch.Tensor, ...]:
        """(last,) or (last, deeper tap, shallower tap), each [B, 64, dim], pooled and scaled.

        A plain tuple of tensors, not a dataclass: ZeRO-3 finds the tensors a module returns to
        hook its backward pass (and re-gather its parameters) only in tuples, lists and dicts.
        """
        x = self.patch_embed_a(fbank) + self.pos_embed_a + self.modality_a
        tapped = {}
        for i, block in enumerate(self.blocks_a):
            x = self._run(block, x)
            if with_taps and i in self.taps:
                tapped[i] = x
        for block in self.blocks_u:
            x = self._run(block, x)
        last = self.pool(self.norm_a(x))
        if not with_taps:
            return (last,)
        deep, shallow = self.taps
        return last, self.pool(self.norm_j(tapped[deep])), self.pool(self.norm_k(tapped[shallow]))
