"""The audio prefix in front of any causal LM, fed through `inputs_embeds`.

GAMA: encoder -> (aggregator over the last layer with taps ; Q-Former over the last layer)
-> one projection each -> [32 Q-Former ; 64 aggregator] = 96 prefix embeddings. LTU: encoder
-> 32 pooled tokens -> one linear projection. The prefix goes first, then the text; text is
right-padded, so positions count from 0 without gaps and the LM's loss sees text only.

This module knows nothing of DeepSpeed, shards or tokenizers: it takes tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .aggregator import Aggregator
from .encoder import AudioEncoder
from .qformer import AudioQFormer

IGNORE = -100


def projection(width: int, hidden: int, two_layer: bool = True) -> nn.Sequential:
    """Parameter-free LayerNorm, then Linear-GELU-Linear (GAMA) or one Linear (LTU)."""
    norm = nn.LayerNorm(width, elementwise_affine=False)
    if not two_layer:
        return nn.Sequential(norm, nn.Linear(width, hidden))
    return nn.Sequential(norm, nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def init_linears(module: nn.Module) -> None:
    """The reference's init for modules that start fresh (the LLM's _init_weights):
    weights N(0, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class GamaAudio(nn.Module):
    """fbank [B, 1024, 128] -> prefix [B, 96, hidden]."""

    def __init__(self, cfg, hidden: int):
        super().__init__()
        a = cfg.audio
        self.encoder = AudioEncoder(a.width, a.heads, a.encoder_depth, a.taps, a.mlp_ratio)
        self.aggregator = Aggregator(a.width, a.heads, a.ffn, a.aggregator_dropout, cfg.aggregator)
        self.qformer = AudioQFormer(
            a.width, a.qformer_layers, a.heads, a.ffn, a.num_queries, a.qformer_dropout
        )
        self.proj_qformer = projection(a.width, hidden)
        self.proj_aggregator = projection(a.width, hidden)
        for module in (self.aggregator, self.proj_qformer, self.proj_aggregator):
            init_linears(module)

    @property
    def num_tokens(self) -> int:
        return self.qformer.num_queries + self.encoder.cols

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        paper = self.aggregator.mode == "paper"
        last, *taps = self.encoder(fbank, with_taps=paper)
        # Released mode never reads the taps, so it does not compute them.
        aggregated = self.aggregator(last, tuple(taps) if paper else (last, last))
        queried = self.qformer(last)
        return torch.cat([self.proj_qformer(queried), self.proj_aggregator(aggregated)], dim=1)

    def unused_parameters(self) -> list[str]:
        unused = [f"aggregator.{n}" for n in self.aggregator.unused_parameters()]
        if self.aggregator.mode == "released":
            unused += [
                f"encoder.{n}"
                for n, _ in self.encoder.named_parameters()
                if n.startswith(("norm_j", "norm_k"))
            ]
        return unused


class LtuAudio(nn.Module):
    """fbank [B, 1024, 128] -> prefix [B, 32, hidden]: LTU's encoder, pooling and projection."""

    def __init__(self, cfg, hidden: int):
        super().__init__()
        a = cfg.audio
        self.encoder = AudioEncoder(a.width, a.heads, a.encoder_depth, a.taps, a.mlp_ratio)
        del self.encoder.norm_j, self.encoder.norm_k  # LTU has no taps
        self.proj = projection(a.width, hidden, two_layer=False)
        init_linears(self.proj)

    @property
    def num_tokens(self) -> int:
        return self.encoder.cols // 2

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        (tokens,) = self.encoder(fbank, with_taps=False)  # [B, 64, width]
        pooled = F.avg_pool1d(tokens.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)
        return self.proj(pooled)

    def unused_parameters(self) -> list[str]:
        return []


@dataclass
class GamaOutput(ModelOutput):
    """A transformers ModelOutput, which ZeRO-3's hooks can look into (a plain dataclass they cannot)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, T, vocab]: text positions only


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy within the text, [B, T-1]; 0 where ignored."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )


class GamaModel(nn.Module):
    def __init__(self, audio: nn.Module, llm: nn.Module, soft_prompt: nn.Module | None = None):
        super().__init__()
        self.audio = audio
        self.llm = llm
        self.soft_prompt = soft_prompt  # GAMA-IT's hint (model/soft_prompt.py), or None

    @property
    def num_audio_tokens(self) -> int:
        return self.audio.num_tokens

    def place(self, fbank, input_ids, attention_mask, has_audio=None):
        """The inputs on the model's device, fbank in the audio modules' dtype: the one place
        that moves them (inference hands in host fp32 tensors; in training they are there already,
        and this costs nothing)."""
        weight = next(self.audio.parameters())
        device = self.llm.get_input_embeddings().weight.device
        fbank = fbank.to(device=device, dtype=weight.dtype)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        return fbank, input_ids, attention_mask, None if has_audio is None else has_audio.to(device)

    def _inputs(self, fbank, input_ids, attention_mask, has_audio, hint_mask=None):
        """[audio prefix ; text] embeddings and their attention mask, on the model's device; the
        soft prompt's embeddings in the text where `hint_mask` says."""
        fbank, input_ids, attention_mask, has_audio = self.place(fbank, input_ids, attention_mask, has_audio)
        text = self.llm.get_input_embeddings()(input_ids)
        if self.soft_prompt is not None:
            hints = torch.zeros_like(input_ids, dtype=torch.bool) if hint_mask is None else hint_mask
            hints = hints.to(input_ids.device)
            text = torch.where(hints[..., None], self.soft_prompt(hints).to(text.dtype), text)
        prefix = self.audio(fbank).to(text.dtype)
        audio_mask = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        if has_audio is not None:
            audio_mask = audio_mask * has_audio.to(attention_mask.dtype)[:, None]
        return torch.cat([prefix, text], dim=1), torch.cat([audio_mask, attention_mask], dim=1)

    def forward(
        self,
        fbank: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
        hint_mask: torch.Tensor | None = None,
    ) -> GamaOutput:
        """Right-padded text after the audio prefix; loss over supervised text tokens.

        Samples whose `has_audio` is False still run every audio module (on whatever fbank
        they carry, the pad value from the collator), so all ranks do the same work; their
        prefix is masked out of attention. `hint_mask` [B, T] marks the soft prompt's positions.
        """
        embeds, mask = self._inputs(fbank, input_ids, attention_mask, has_audio, hint_mask)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions(mask),
            logits_to_keep=input_ids.shape[1],
            use_cache=False,
        )
        loss = None
        if labels is not None:
            labels = labels.to(out.logits.device)
            losses = token_losses(out.logits, labels)
            count = (labels[:, 1:] != IGNORE).sum()
            loss = losses.sum() / count.clamp(min=1)
        return GamaOutput(loss, out.logits)

    @torch.no_grad()
    def generate(
        self,
        fbank: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        has_audio: torch.Tensor | None = None,
        hint_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Batched generation from left-padded prompts; returns only the new token ids.

        The sequence is [audio prefix][pads][prompt]: every prompt ends at the last
        position, the pads are masked, and positions come from the mask (transformers'
        generate derives them the same way), so each sample sees exactly what it would see
        alone. Greedy, sampling and beam search all go through `llm.generate`.
        """
        embeds, mask = self._inputs(fbank, input_ids, attention_mask, has_audio, hint_mask)
        if "synced_gpus" not in generate_kwargs:
            # Under ZeRO-3 every forward gathers parameters from all ranks, so a rank that has
            # finished must keep stepping until all have; transformers only knows when asked.
            generate_kwargs["synced_gpus"] = _zero3_distributed(self)
        # The ids behind the embeddings go along for the logits processors that read them: the
        # reference's repetition penalty covers the prompt's tokens, not only the new ones. The
        # audio positions, and the soft prompt's, repeat each row's first id, which the row holds already.
        ids = input_ids.to(mask.device)
        if hint_mask is not None:
            ids = torch.where(hint_mask.to(ids.device), ids[:, :1], ids)
        ids = torch.cat([ids[:, :1].expand(-1, embeds.shape[1] - ids.shape[1]), ids], dim=1)
        out = self.llm.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
        if isinstance(out, torch.Tensor):
            return out[:, ids.shape[1] :]
        out.sequences = out.sequences[:, ids.shape[1] :]  # return_dict_in_generate
        return out


def _zero3_distributed(model: nn.Module) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(hasattr(p, "ds_id") for p in model.parameters())


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only attended tokens; padding gets 0 (it is masked anyway)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)
