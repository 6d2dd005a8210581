"""A tagger's input made from our stored features, without decoding the audio again.

AST's feature extractor (transformers' ASTFeatureExtractor) computes the same Kaldi fbank as
GAMA's recipe (gama_ds/audio.py: 128 mel bins, 25 ms Hanning windows every 10 ms, no dither,
pre-emphasis 0.97, per-frame DC removal, 20 Hz to 8 kHz) and differs after it: it pads the RAW
fbank with zeros to `max_length` frames (or cuts it there) and then normalises with its own
statistics as (raw - mean) / (2 * std). Our shards hold (raw + 5.081) / 4.4849, unpadded, in
float16. So the raw fbank is recovered exactly up to float16 rounding and renormalised.

One difference in front of the fbank does not matter: GAMA subtracts the waveform's mean before
the fbank, AST's extractor does not; Kaldi's per-frame DC removal subtracts every frame's own
mean before pre-emphasis and windowing, so a constant offset of the whole waveform never reaches
the spectrum (tests/test_tags.py checks it on real audio).

Frames past our stored 1,024 are gone; a tagger whose `max_length` is longer sees the clip's
first 1,024 frames padded, where its own extractor would have seen more of the clip.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..audio import NORM_MEAN, NORM_STD, NUM_MEL_BINS, SAMPLE_RATE, TARGET_FRAMES
from .checks import TaggerError

PREPROCESSOR = "preprocessor_config.json"
EXTRACTOR = "ASTFeatureExtractor"


@dataclass(frozen=True)
class FeatureRule:
    """The tagger extractor's settings that turn our features into its input."""

    mean: float
    std: float
    max_length: int
    do_normalize: bool

    @classmethod
    def from_folder(cls, folder: str) -> FeatureRule:
        """Read and check `preprocessor_config.json`: only a 128-bin Kaldi-fbank extractor at
        16 kHz computes what our shards store."""
        path = os.path.join(folder, PREPROCESSOR)
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise TaggerError(
                f"--tagger {folder}: no {PREPROCESSOR}; a tagger needs its feature extractor's settings"
            ) from None
        except (OSError, json.JSONDecodeError) as err:
            raise TaggerError(f"{path}: unreadable: {err}") from None
        kind = cfg.get("feature_extractor_type") if isinstance(cfg, dict) else None
        if kind != EXTRACTOR:
            raise TaggerError(
                f"--tagger {folder}: its feature extractor is {kind!r}, not {EXTRACTOR}: only a "
                f"{NUM_MEL_BINS}-bin Kaldi-fbank tagger (AST) can be fed from the stored features"
            )
        sr, bins = cfg.get("sampling_rate", SAMPLE_RATE), cfg.get("num_mel_bins", NUM_MEL_BINS)
        if sr != SAMPLE_RATE or bins != NUM_MEL_BINS:
            raise TaggerError(
                f"{path}: {bins} mel bins at {sr} Hz; the stored features are {NUM_MEL_BINS} bins at "
                f"{SAMPLE_RATE} Hz"
            )
        # ASTFeatureExtractor's own defaults, for a config that leaves one out.
        mean, std = cfg.get("mean", -4.2677393), cfg.get("std", 4.5689974)
        max_length, normalize = cfg.get("max_length", 1024), cfg.get("do_normalize", True)
        numbers = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, std))
        if not numbers or not std > 0:
            raise TaggerError(f"{path}: mean {mean!r} and std {std!r} must be numbers, std positive")
        if not isinstance(max_length, int) or max_length < 1 or not isinstance(normalize, bool):
            raise TaggerError(f"{path}: max_length {max_length!r} or do_normalize {normalize!r} is invalid")
        return cls(float(mean), float(std), max_length, normalize)

    @property
    def pad_value(self) -> float:
        """What the extractor's zero padding of the raw fbank becomes."""
        return (0.0 - self.mean) / (self.std * 2) if self.do_normalize else 0.0

    def describe(self) -> dict:
        return {
            "from": f"stored features: raw fbank = stored * {NORM_STD} + ({NORM_MEAN})",
            "normalise": (
                {"mean": self.mean, "std": self.std, "rule": "(raw - mean) / (2 * std)"}
                if self.do_normalize
                else None
            ),
            "max_length": self.max_length,
            "pad": f"raw zeros after the clip, {self.pad_value:.6g} once normalised",
            "frames_seen": min(self.max_length, TARGET_FRAMES),
        }

    def inputs(self, fbanks: list[np.ndarray]) -> torch.Tensor:
        """Stored features (each [n, 128], float16 or float32) -> float32 [B, max_length, 128]."""
        out = torch.full((len(fbanks), self.max_length, NUM_MEL_BINS), self.pad_value, dtype=torch.float32)
        for i, fbank in enumerate(fbanks):
            if fbank.ndim != 2 or fbank.shape[1] != NUM_MEL_BINS or fbank.shape[0] < 1:
                raise TaggerError(
                    f"clip {i}: features of shape {list(fbank.shape)}, expected [n, {NUM_MEL_BINS}]"
                )
            n = min(fbank.shape[0], self.max_length)
            # Same operation order as the extractor's, in float32.
            raw = torch.as_tensor(fbank[:n]).float() * NORM_STD + NORM_MEAN
            out[i, :n] = (raw - self.mean) / (self.std * 2) if self.do_normalize else raw
        return out
