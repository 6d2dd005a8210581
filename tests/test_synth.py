"""The demo's synthetic clips: the answers are what the audio says."""

from __future__ import annotations

import numpy as np

from gama_ds.synth import make_clip


def bursts(wav: np.ndarray, sr: int) -> int:
    """Runs of 50 ms frames louder than twice the background noise (0.002 rms)."""
    hop = sr // 20
    frames = wav[: len(wav) // hop * hop].reshape(-1, hop)
    loud = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) > 0.004
    return int(np.count_nonzero(loud[1:] & ~loud[:-1]) + loud[0])


def test_every_burst_can_be_counted_in_the_samples():
    rng = np.random.default_rng(0)
    for sr in (16000, 22050, 48000):
        for _ in range(60):
            wav, attrs = make_clip(rng, sr)
            assert bursts(wav, sr) == attrs["count"], attrs
