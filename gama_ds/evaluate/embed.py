"""A sentence embedder from a local folder: any HF encoder (BERT, a SentenceBERT export), with
its pooling stated, so that a score says exactly which vectors it compared.

LTU's reported numbers used OpenAI's text-embedding-ada-002; its local fallback was the mean of
bert-large-uncased's last hidden state over every token ([CLS] and [SEP] included), which is
`pooling="mean"` here. Nothing is fetched: the folder must hold the weights and tokenizer.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import UsageError

POOLINGS = ("mean", "cls", "max")

# sentence-transformers writes its pooling choice to 1_Pooling/config.json.
_ST_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def folder_pooling(path: str) -> str | None:
    """The pooling a sentence-transformers folder declares, or None when it declares none."""
    config = os.path.join(path, "1_Pooling", "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            declared = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"{config}: unreadable pooling config: {err}") from None
    if not isinstance(declared, dict):
        raise UsageError(f"{config}: not a sentence-transformers pooling config")
    modes = [mode for key, mode in _ST_MODES.items() if declared.get(key)]
    if len(modes) != 1:
        raise UsageError(f"{config}: pools by {modes or 'none of mean/cls/max'}; give --pooling")
    return modes[0]


class TextEmbedder:
    """Sentences -> unit vectors. `pooling`: mean (over real tokens), cls, or max; None takes
    the folder's sentence-transformers setting, else mean."""

    def __init__(self, path: str, pooling: str | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(path):
            raise UsageError(f"embedder {path} is not a folder (an HF text-encoder folder)")
        if pooling is not None and pooling not in POOLINGS:
            raise UsageError(f"pooling {pooling!r}; one of {', '.join(POOLINGS)}")
        if batch_size < 1:
            raise UsageError(f"embedder batch size {batch_size}; at least 1")
        self.path = os.path.abspath(path)
        self.pooling = pooling or folder_pooling(path) or "mean"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    def describe(self) -> dict:
        return {"path": self.path, "pooling": self.pooling, "model_type": self.model.config.model_type}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            )
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(pooled)
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)
