"""Examples -> model batches: prompt template, tokenisation, labels, padding.

The reference's recipe (reference/gama.md §1.7, §3.2): the `alpaca_short` template, the
answer appended directly after the prompt, truncation at `cutoff_len` text tokens, EOS
appended when it fits, and by default the whole text supervised (`train_on_inputs`). Text is
right-padded; padding and (optionally) the prompt get label -100. The fbank is padded to
1024 frames with the normalised pad value. With a soft prompt (`model.soft_prompt`), the clip's
tags go into the prompt as data/soft_prompt.py says, and `hint_mask` marks the soft tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..audio import NUM_MEL_BINS, PAD_VALUE, TARGET_FRAMES, pad_features
from ..errors import GamaDsError
from .prompts import TEMPLATES, prompt_text
from .soft_prompt import PLACEHOLDER, encode, with_sentence

IGNORE = -100


@dataclass
class Example:
    """One QA pair of one clip; `fbank` is None for a text-only example."""

    key: str  # "<set>/<shard>/<sample key>#<qa index>": unique, for tracing and resume tests
    fbank: np.ndarray | None  # float16 [n_frames, 128], unpadded
    qa: dict
    tokens: tuple[list[int], list[int]] | None = None  # (input_ids, labels), once tokenised
    # The clip's audio event tags, [[label, score], ...] score-descending ([]: none passed the
    # tagging's top_k and threshold); None: its shard set is not tagged (data/tag_sidecar.py).
    tags: list | None = None


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one that is already in its vocabulary.

    Padding is always masked by the attention mask and labelled -100 by position, so reusing
    unk (Llama's choice at inference) or eos (the reference's choice in training) is safe; the
    vocabulary, and so the LLM's embedding matrix, never changes.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise GamaDsError("the tokenizer has no pad, unk or eos token to pad with; give one that has")


class Collator:
    def __init__(
        self,
        tokenizer,
        cutoff_len: int = 108,
        template: str = "alpaca_short",
        train_on_inputs: bool = True,
        add_eos: bool = True,
        soft_prompt=None,
    ):
        if template not in TEMPLATES:  # a recipe's is checked on loading; an export's is checked here
            raise GamaDsError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
        ensure_pad_token(tokenizer)
        self.tokenizer = tokenizer
        self.cutoff_len = cutoff_len
        self.template = template
        self.train_on_inputs = train_on_inputs
        self.add_eos = add_eos
        self.soft_prompt = soft_prompt  # config.SoftPromptConfig, or None

    def prompt(self, qa: dict, tags: list | None = None, has_audio: bool = True, where: str = "") -> str:
        """The prompt text; with a soft prompt, the tags' sentence in it and its hint a SENTINEL."""
        return prompt_text(with_sentence(qa, tags, has_audio, self.soft_prompt, where), self.template)

    def encode(self, prompt: str, answer: str = "") -> list[int]:
        """Token ids of prompt + answer, cut at cutoff_len, soft tokens as PLACEHOLDER."""
        tokens = self.soft_prompt.tokens if self.soft_prompt is not None else 0
        return encode(self.tokenizer, prompt, answer, tokens, self.cutoff_len)

    def tokenize(
        self, qa: dict, tags: list | None = None, has_audio: bool = True, where: str = ""
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one QA pair, as the reference's `tokenize` does it; soft
        tokens are PLACEHOLDER in the ids and never supervised."""
        prompt = self.prompt(qa, tags, has_audio, where)
        tok = self.tokenizer
        ids = self.encode(prompt, qa["output"])
        if self.add_eos and len(ids) < self.cutoff_len and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]
        labels = [IGNORE if i == PLACEHOLDER else i for i in ids]
        if not self.train_on_inputs:
            n_prompt = len(self.encode(prompt))
            labels[:n_prompt] = [IGNORE] * min(n_prompt, len(labels))
        return ids, labels

    def example_tokens(self, example: Example) -> tuple[list[int], list[int]]:
        if example.tokens is None:  # kept: bucketing and collation then tokenise once
            example.tokens = self.tokenize(example.qa, example.tags, example.fbank is not None, example.key)
        return example.tokens

    def settings(self) -> dict:
        """Everything that decides the token ids, for the stream's resume digest."""
        tok = self.tokenizer
        settings = {
            "cutoff_len": self.cutoff_len,
            "template": self.template,
            "train_on_inputs": self.train_on_inputs,
            "add_eos": self.add_eos,
            "tokenizer": [type(tok).__name__, len(tok), tok.name_or_path],
        }
        if self.soft_prompt is not None:  # only then: the digests of runs without one stay as they were
            settings["soft_prompt"] = asdict(self.soft_prompt)
        return settings

    def length(self, example: Example) -> int:
        return len(self.example_tokens(example)[0])

    def __call__(self, examples: list[Example], with_audio: bool = True) -> dict[str, torch.Tensor]:
        tokenized = [self.example_tokens(e) for e in examples]
        width = max(len(ids) for ids, _ in tokenized)
        b = len(examples)
        input_ids = torch.full((b, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), IGNORE, dtype=torch.long)
        for i, (ids, lab) in enumerate(tokenized):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        hint_mask = input_ids == PLACEHOLDER
        input_ids[hint_mask] = self.tokenizer.pad_token_id  # any real id: the soft embeddings replace it
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "hint_mask": hint_mask,
            "has_audio": torch.tensor([e.fbank is not None for e in examples]),
            "text_tokens": attention_mask.sum(),  # real text tokens, for throughput
            "pad_fraction": 1.0 - attention_mask.float().mean(),
        }
        if with_audio:
            silent = torch.full((TARGET_FRAMES, NUM_MEL_BINS), PAD_VALUE)
            batch["fbank"] = torch.stack(
                [silent if e.fbank is None else pad_features(torch.from_numpy(e.fbank)) for e in examples]
            )
        return batch
