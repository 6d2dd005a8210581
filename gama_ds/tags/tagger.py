"""An audio tagger run on our stored features: `Tagger(folder).tag(fbanks, top_k, threshold)`.

The folder is any transformers `AutoModelForAudioClassification` folder whose feature extractor
is AST's (feature_rule.py says why only that one). Scores are the activation of the logits:
sigmoid for a multi-label tagger (AudioSet's 527 classes, trained with a binary loss), softmax
for a single-label classifier, as the config's `problem_type` says; a config without one is
taken as multi-label (what a tagger is: a clip holds several events). `activation=` overrides.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..model.llm_folder import fingerprint
from ..placement import DTYPES, choose_device, choose_dtype
from .checks import TaggerError, check_tagging, label_names, read_config, resolve_activation
from .feature_rule import FeatureRule


class Tagger:
    """A loaded tagger. `tag` takes our stored features and returns, per clip, the top labels
    as [(label, score)], score-descending, at most top_k, each at least threshold."""

    def __init__(
        self,
        path: str,
        device: str | None = None,
        dtype: str | None = None,
        activation: str = "auto",
        top_k: int | None = None,
    ):
        self.path = os.path.abspath(path)
        config = read_config(path)
        self.activation, self.activation_rule = resolve_activation(config, activation, path)
        self.rule = FeatureRule.from_folder(path)
        self.labels = label_names(config)
        if top_k is not None and top_k > len(self.labels):
            raise TaggerError(f"--top-k {top_k} is more than the tagger's {len(self.labels)} labels")
        for key in ("max_length", "num_mel_bins"):
            want = self.rule.max_length if key == "max_length" else 128
            if key in config and config[key] != want:
                raise TaggerError(
                    f"{path}: config.json's {key} {config[key]} differs from its feature extractor's {want}"
                )
        self.device = choose_device(device)
        self.dtype = choose_dtype(dtype, self.device)
        from transformers import AutoModelForAudioClassification

        try:
            model = AutoModelForAudioClassification.from_pretrained(path, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as err:
            raise TaggerError(f"--tagger {path}: not loadable as an audio classifier: {err}") from None
        if model.config.num_labels != len(self.labels):
            raise TaggerError(f"{path}: {model.config.num_labels} outputs for {len(self.labels)} labels")
        self.model = model.to(self.device).eval()
        self.fingerprint = fingerprint(path)
        self.config = config

    def describe(self) -> dict:
        """What decides the tags: for the shard index's provenance and for exports."""
        return {
            "path": self.path,
            "fingerprint": self.fingerprint,
            "model_type": self.config.get("model_type"),
            "architecture": (self.config.get("architectures") or [type(self.model).__name__])[0],
            "labels": self.labels,
            "activation": self.activation,
            "activation_rule": self.activation_rule,
            "feature_rule": self.rule.describe(),
            "device": self.device.type,
            "dtype": next(k for k, v in DTYPES.items() if v == self.dtype),
        }

    def inputs(self, fbanks: list[np.ndarray]) -> torch.Tensor:
        """The model's input_values for stored features (float32, on the CPU)."""
        return self.rule.inputs(fbanks)

    @torch.inference_mode()
    def logits(self, fbanks: list[np.ndarray]) -> torch.Tensor:
        """float32 [B, labels] for one batch."""
        x = self.inputs(fbanks).to(self.device, self.dtype)
        return self.model(input_values=x).logits.float().cpu()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=-1)

    def tag(
        self, fbanks: list[np.ndarray], top_k: int, threshold: float, batch_size: int = 16
    ) -> list[list[tuple[str, float]]]:
        check_tagging(top_k, threshold, batch_size)
        k = min(top_k, len(self.labels))
        out: list[list[tuple[str, float]]] = []
        for start in range(0, len(fbanks), batch_size):
            scores = self.scores(self.logits(fbanks[start : start + batch_size]))
            values, index = torch.topk(scores, k, dim=-1)  # sorted, descending
            for vs, ids in zip(values.tolist(), index.tolist(), strict=True):
                if not all(math.isfinite(v) for v in vs):
                    raise TaggerError(f"--tagger {self.path}: non-finite scores (dtype {self.dtype})")
                out.append([(self.labels[i], v) for v, i in zip(vs, ids, strict=True) if v >= threshold])
        return out
