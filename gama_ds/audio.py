"""The one audio front end: read, resample, Kaldi fbank, normalise, pad.

Conversion uses it to precompute features and inference uses it on a user's file, so the
two can never drift apart. The recipe is the reference GAMA collator's (reference/gama.md
§1.1): resample to 16 kHz, subtract the waveform mean, take the first channel, Kaldi fbank
with 128 mel bins over 25 ms Hanning windows every 10 ms, normalise with the CAV-MAE
statistics and keep the first 1024 frames.
"""

from __future__ import annotations

import io
import math
import os
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile

from .errors import GamaDsError, UsageError

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
FRAME_LENGTH = 400  # samples: 25 ms at 16 kHz
FRAME_SHIFT = 160  # samples: 10 ms at 16 kHz
TARGET_FRAMES = 1024
NORM_MEAN = -5.081
NORM_STD = 4.4849
# The reference pads the raw fbank with zeros and then normalises, so padded frames hold
# this value; features are stored unpadded and padded with it at load time.
PAD_VALUE = (0.0 - NORM_MEAN) / NORM_STD

BACKENDS = ("torchaudio", "transformers")

RECIPE = {
    "sample_rate": SAMPLE_RATE,
    "channel": "first, after subtracting the mean over all channels",
    "fbank": {
        "num_mel_bins": NUM_MEL_BINS,
        "frame_length_ms": 25.0,
        "frame_shift_ms": 10.0,
        "window_type": "hanning",
        "htk_compat": True,
        "use_energy": False,
        "dither": 0.0,
        "preemphasis": 0.97,
        "remove_dc_offset": True,
        "low_freq_hz": 20.0,
        "high_freq_hz": SAMPLE_RATE / 2,
        "snip_edges": True,
    },
    "normalise": {"mean": NORM_MEAN, "std": NORM_STD},
    "max_frames": TARGET_FRAMES,
    "pad_value": PAD_VALUE,
    "stored": {"dtype": "float16", "shape": ["n_frames", NUM_MEL_BINS], "padded": False},
}


class AudioError(GamaDsError, ValueError):
    """A clip that cannot become features; `reason` is one of the reject reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ClipInfo:
    sample_rate: int
    channels: int
    num_samples: int
    n_frames: int
    truncated: bool

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


def read_audio(src: str | os.PathLike | bytes) -> tuple[np.ndarray, int]:
    """Decode a file path or encoded bytes to float32 [channels, samples] in [-1, 1]."""
    where = "<bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src)
    handle = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else where
    try:
        data, sr = soundfile.read(handle, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError("unreadable audio", f"{where}: {err}") from err
    if data.shape[0] == 0:
        raise AudioError("empty audio", f"{where}: no samples")
    return np.ascontiguousarray(data.T), int(sr)


@lru_cache(maxsize=1)
def torchaudio_importable() -> bool:
    try:
        import torchaudio.compliance.kaldi  # noqa: F401
        import torchaudio.functional  # noqa: F401
    except Exception:  # a CUDA build next to a CPU torch raises OSError, not ImportError
        # transformers imports torchaudio whenever the package is installed; marking it
        # absent lets the fallback backend (transformers' audio_utils) import.
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        sys.modules["torchaudio"] = None
        return False
    return True


def resolve_backend(name: str = "auto") -> str:
    """'auto' means torchaudio's kaldi.fbank (the reference path) when it imports."""
    if name == "auto":
        return "torchaudio" if torchaudio_importable() else "transformers"
    if name not in BACKENDS:
        raise UsageError(f"unknown feature backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    if name == "torchaudio" and not torchaudio_importable():
        raise UsageError("feature backend 'torchaudio' requested but torchaudio does not import")
    return name


def first_channel_16k(wav: np.ndarray, sr: int, backend: str) -> np.ndarray:
    """Resample [C, N] to 16 kHz, subtract the mean over all channels, keep channel 0.

    The torchaudio path runs in torch, as the reference does, so that even float32 rounding
    matches it.
    """
    if backend == "torchaudio":
        import torch
        import torchaudio.functional

        w = torch.from_numpy(wav)
        if sr != SAMPLE_RATE:
            w = torchaudio.functional.resample(w, sr, SAMPLE_RATE)
        return (w - w.mean())[0].contiguous().numpy()
    if sr != SAMPLE_RATE:
        from scipy.signal import resample_poly

        g = math.gcd(sr, SAMPLE_RATE)
        wav = resample_poly(wav, SAMPLE_RATE // g, sr // g, axis=-1).astype(np.float32)
    return np.ascontiguousarray((wav - wav.mean())[0])


def _fbank_torchaudio(signal: np.ndarray) -> np.ndarray:
    import torch
    from torchaudio.compliance import kaldi

    out = kaldi.fbank(
        torch.from_numpy(signal)[None],
        htk_compat=True,
        sample_frequency=SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=NUM_MEL_BINS,
        dither=0.0,
        frame_shift=10,
    )
    return out.numpy()


@lru_cache(maxsize=1)
def _kaldi_tables() -> tuple[np.ndarray, np.ndarray]:
    from transformers.audio_utils import mel_filter_bank, window_function

    window = window_function(FRAME_LENGTH, "hann", periodic=False)
    # 128 Kaldi bins on a 512-point FFT leave the lowest filter empty, in Kaldi too; the
    # library warns about it, but it is the recipe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mel = mel_filter_bank(
            num_frequency_bins=257,
            num_mel_filters=NUM_MEL_BINS,
            min_frequency=20.0,
            max_frequency=SAMPLE_RATE / 2,
            sampling_rate=SAMPLE_RATE,
            norm=None,
            mel_scale="kaldi",
            triangularize_in_mel_space=True,
        )
    return window, mel


def _fbank_transformers(signal: np.ndarray) -> np.ndarray:
    torchaudio_importable()  # a broken torchaudio must be marked absent before transformers loads
    from transformers.audio_utils import spectrogram

    window, mel = _kaldi_tables()
    spec = spectrogram(
        signal.astype(np.float64),
        window,
        frame_length=FRAME_LENGTH,
        hop_length=FRAME_SHIFT,
        fft_length=512,
        power=2.0,
        center=False,
        preemphasis=0.97,
        mel_filters=mel,
        log_mel="log",
        mel_floor=float(np.finfo(np.float32).eps),
        remove_dc_offset=True,
    )
    return spec.T.astype(np.float32)


def fbank_from_waveform(wav: np.ndarray, sr: int, backend: str = "auto") -> tuple[np.ndarray, int]:
    """[C, N] (or mono [N]) float waveform at any rate -> (normalised float32 [n<=1024, 128], total frames).

    The second value is the frame count before truncation, so callers can record whether
    the clip was cut.
    """
    backend = resolve_backend(backend)
    wav = np.atleast_2d(np.asarray(wav, dtype=np.float32))  # a mono [N] array is one channel
    if wav.ndim != 2:
        raise ValueError(f"expected a waveform [channels, samples], got shape {list(wav.shape)}")
    signal = first_channel_16k(np.ascontiguousarray(wav), sr, backend)
    total = 1 + (signal.shape[0] - FRAME_LENGTH) // FRAME_SHIFT if signal.shape[0] >= FRAME_LENGTH else 0
    if total < 1:
        raise AudioError(
            "shorter than one frame",
            f"{signal.shape[0]} samples at 16 kHz; one 25 ms frame needs {FRAME_LENGTH}",
        )
    # Frames past the first 1024 are discarded anyway; skip computing them.
    keep = min(total, TARGET_FRAMES)
    signal = signal[: FRAME_LENGTH + (keep - 1) * FRAME_SHIFT]
    raw = _fbank_torchaudio(signal) if backend == "torchaudio" else _fbank_transformers(signal)
    feats = (raw - NORM_MEAN) / NORM_STD
    if not np.isfinite(feats).all():
        raise AudioError("non-finite features", "fbank produced NaN or inf")
    return feats.astype(np.float32, copy=False), total


def load_features(src: str | os.PathLike | bytes, backend: str = "auto") -> tuple[np.ndarray, ClipInfo]:
    """Read one clip and compute its normalised, unpadded features."""
    wav, sr = read_audio(src)
    feats, total = fbank_from_waveform(wav, sr, backend)
    info = ClipInfo(
        sample_rate=sr,
        channels=wav.shape[0],
        num_samples=wav.shape[1],
        n_frames=feats.shape[0],
        truncated=total > TARGET_FRAMES,
    )
    return feats, info


def pad_features(feats, target: int = TARGET_FRAMES):
    """Pad (or cut) [n, 128] features to [target, 128] float32 with the normalised pad value.

    Accepts numpy arrays or torch tensors of any float dtype and returns the same kind. The
    float16 -> float32 copy runs in torch, several times faster than numpy's.
    """
    import torch

    src = torch.as_tensor(feats)
    n = min(src.shape[0], target)
    out = torch.empty((target, src.shape[1]), dtype=torch.float32)
    out[:n].copy_(src[:n])
    out[n:].fill_(PAD_VALUE)
    return out if isinstance(feats, torch.Tensor) else out.numpy()
