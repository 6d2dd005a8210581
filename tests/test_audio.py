"""The audio front end reproduces the reference recipe on real files of every kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional
from torchaudio.compliance import kaldi

from conftest import CLIPS, tone_mix, write_audio
from gama_ds import audio


def reference_fbank(waveform: torch.Tensor) -> np.ndarray:
    """The GAMA collator's recipe, spelled out independently of gama_ds (reference/gama.md §1.1)."""
    fbank = kaldi.fbank(
        waveform,
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    return ((fbank[:1024] + 5.081) / 4.4849).numpy()


def reference_features(path) -> np.ndarray:
    data, sr = soundfile.read(path, dtype="float32", always_2d=True)
    waveform = torch.from_numpy(data.T.copy())
    if sr != 16000:
        waveform = torchaudio.functional.resample(waveform, orig_freq=sr, new_freq=16000)
    return reference_fbank(waveform - waveform.mean())


@pytest.mark.parametrize("name,seconds,sr,channels,subtype", CLIPS, ids=[c[0] + "-" + c[4] for c in CLIPS])
def test_features_equal_reference_recipe(tmp_path, name, seconds, sr, channels, subtype):
    path = write_audio(tmp_path / name, seconds, sr, channels, subtype)
    feats, info = audio.load_features(path, "torchaudio")
    ref = reference_features(path)
    assert feats.shape == ref.shape == (min(1024, 1 + (round(seconds * 16000) - 400) // 160), 128)
    np.testing.assert_array_equal(feats, ref)  # bit for bit, before float16 storage
    assert (info.sample_rate, info.channels, info.n_frames) == (sr, channels, feats.shape[0])
    assert info.duration == pytest.approx(seconds, abs=1 / sr)


def test_lossless_float_file_reads_back_exactly(tmp_path):
    path = write_audio(tmp_path / "x.wav", 0.5, 44100, 2, "FLOAT")
    wav, sr = audio.read_audio(path)
    np.testing.assert_array_equal(wav, tone_mix(0.5, 44100, 2).T)
    assert sr == 44100


def test_stereo_uses_first_channel_after_global_mean(tmp_path):
    data = tone_mix(1.0, 16000, 2)
    data[:, 1] = 0.9 * np.sign(np.sin(np.arange(16000) / 3.0))  # a loud, different second channel
    path = str(tmp_path / "s.wav")
    soundfile.write(path, data, 16000, subtype="FLOAT")
    feats, _ = audio.load_features(path)

    def kaldi_of(channel: np.ndarray) -> np.ndarray:
        return reference_fbank(torch.from_numpy(channel)[None])

    np.testing.assert_allclose(feats, kaldi_of(data[:, 0] - data.mean()), atol=1e-4)
    assert np.abs(feats - kaldi_of(data[:, 1] - data.mean())).mean() > 0.5


def test_a_mono_1d_waveform_is_one_channel():
    wav = tone_mix(1.0, 22050)[:, 0]
    for backend in audio.BACKENDS:
        flat, _ = audio.fbank_from_waveform(wav, 22050, backend)
        np.testing.assert_array_equal(flat, audio.fbank_from_waveform(wav[None], 22050, backend)[0])


def test_ten_seconds_gives_998_frames_and_long_clips_keep_the_first_1024(tmp_path):
    ten, info10 = audio.load_features(write_audio(tmp_path / "ten.wav", 10.0))
    assert ten.shape == (998, 128) and not info10.truncated
    long, info = audio.load_features(write_audio(tmp_path / "long.wav", 12.0))
    assert long.shape == (1024, 128) and info.truncated
    np.testing.assert_array_equal(long, reference_features(tmp_path / "long.wav"))


def test_bytes_and_path_give_the_same_features(tmp_path):
    path = write_audio(tmp_path / "x.flac", 1.0, 22050, 1, "PCM_16")
    with open(path, "rb") as f:
        from_bytes, _ = audio.load_features(f.read())
    np.testing.assert_array_equal(from_bytes, audio.load_features(path)[0])


def test_padding_uses_the_normalised_zero(tmp_path):
    feats, _ = audio.load_features(write_audio(tmp_path / "x.wav", 1.0))
    assert audio.PAD_VALUE == pytest.approx(1.1329, abs=1e-4)
    for padded in (audio.pad_features(feats), audio.pad_features(torch.from_numpy(feats)).numpy()):
        assert padded.shape == (1024, 128) and padded.dtype == np.float32
        np.testing.assert_array_equal(padded[: len(feats)], feats)
        assert (padded[len(feats) :] == np.float32(audio.PAD_VALUE)).all()


@pytest.mark.parametrize(
    "samples,reason", [(0, "empty audio"), (399, "shorter than one frame")], ids=["empty", "short"]
)
def test_clips_without_a_frame_are_refused(tmp_path, samples, reason):
    path = str(tmp_path / "x.wav")
    soundfile.write(path, np.zeros(samples, dtype=np.float32), 16000)
    with pytest.raises(audio.AudioError) as err:
        audio.load_features(path)
    assert err.value.reason == reason


def test_garbage_is_unreadable(tmp_path):
    path = tmp_path / "x.wav"
    path.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    with pytest.raises(audio.AudioError) as err:
        audio.load_features(str(path))
    assert err.value.reason == "unreadable audio" and "x.wav" in str(err.value)


def test_a_broken_torchaudio_falls_back_and_the_index_says_so(tmp_path):
    """A torchaudio that raises OSError on import (a CUDA build beside a CPU torch) must not
    take transformers down with it: conversion falls back and records the backend."""
    fake = tmp_path / "site" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise OSError("libc10_cuda.so: cannot open shared object file")\n')
    write_audio(tmp_path / "a.wav", 1.0, 44100)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"audio": "a.wav", "question": "Q", "answer": "A"}) + "\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gama_ds",
            "convert",
            str(src),
            "--out",
            str(out),
            "--workers",
            "2",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    index = json.loads((out / "index.json").read_text())
    assert (
        index["features"]["backend"] == "transformers"
        and "torchaudio" not in index["provenance"]["libraries"]
    )


def test_backend_names_are_checked():
    assert audio.resolve_backend("auto") == "torchaudio"
    with pytest.raises(ValueError, match="unknown feature backend"):
        audio.resolve_backend("librosa")


# The bounds below are the ones docs/FORMAT.md states for the transformers fallback.
def _signals():
    rng = np.random.default_rng(3)
    t = np.arange(16000 * 4) / 16000
    return {
        "noise": 0.1 * rng.standard_normal(t.size),
        "chirp": 0.3 * np.sin(2 * np.pi * (100 + 700 * t) * t) + 0.01 * rng.standard_normal(t.size),
        "quiet": 1e-4 * rng.standard_normal(t.size),
    }


def _backend_diff(signal: np.ndarray, sr: int) -> np.ndarray:
    x = torch.from_numpy(signal.astype(np.float32))[None]
    if sr != 16000:
        x = torchaudio.functional.resample(x, 16000, sr)
    a, _ = audio.fbank_from_waveform(x.numpy(), sr, "torchaudio")
    b, _ = audio.fbank_from_waveform(x.numpy(), sr, "transformers")
    assert a.shape == b.shape
    return np.abs(a - b)


def test_fallback_backend_matches_torchaudio_at_16k():
    for name, signal in _signals().items():
        assert _backend_diff(signal, 16000).max() <= 0.002, name


@pytest.mark.parametrize("sr", [22050, 44100, 48000])
def test_fallback_backend_after_downsampling(sr):
    for name, signal in _signals().items():
        d = _backend_diff(signal, sr)
        assert d.mean() <= 0.01 and d.max() <= 0.25, (name, d.mean(), d.max())


def test_fallback_backend_after_upsampling_from_8k_below_3_6_khz():
    mel = lambda f: 1127 * np.log1p(f / 700)  # noqa: E731 - Kaldi's mel scale
    centres = 700 * np.expm1((mel(20) + (mel(8000) - mel(20)) * np.arange(1, 129) / 129) / 1127)
    below = centres < 3600
    for name, signal in _signals().items():
        d = _backend_diff(signal, 8000)[:, below]
        assert d.mean() <= 0.01 and d.max() <= 0.5, (name, d.mean(), d.max())
