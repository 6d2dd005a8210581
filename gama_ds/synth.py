"""A small synthetic audio QA set that needs no download: beeps a model can learn to hear.

Each clip (4-6 s) is one to four 0.4 s bursts of either a tone (high or low pitch) or
noise, loud or quiet, over faint background noise. Several question forms per clip ask for
the count, the pitch, the sound type and the loudness, so the answers depend on the audio
alone.
Clips are written as real audio files in a mix of formats and rates, with a GAMA-format
training JSON, an evaluation-format test JSON, and a word-level tokenizer of the set's text.
"""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile

from .errors import UsageError

COUNT_WORDS = ("one", "two", "three", "four")
CLIP_SECONDS = (4.0, 6.0)  # of the encoder's 10.24 s window; the rest is padding
BURST_SECONDS = 0.4  # about 2.5 of the encoder's 64 time tokens
# The quiet after each burst: more than two of the encoder's 0.16 s time tokens, so that at
# least one token between two bursts is silent wherever the bursts fall (0.25 s was not: two
# bursts could share every token between them, and the count was lost in the features).
GAP_SECONDS = 0.35
QUESTIONS = {
    "count": ("How many beeps are in the audio?", "Count the sound events in this clip."),
    "pitch": ("Is the pitch of the sound high or low?", "Is this a high or a low sound?"),
    "kind": ("Is this a tone or noise?", "What type of sound is this: tone or noise?"),
    "loudness": ("Is the sound loud or quiet?", "How loud is the sound: loud or quiet?"),
}
# (file extension, soundfile subtype, sample rate): the set exercises every reader path.
FORMATS = (
    ("wav", "PCM_16", 16000),
    ("wav", "PCM_16", 16000),
    ("flac", "PCM_16", 22050),
    ("wav", "FLOAT", 44100),
    ("ogg", "VORBIS", 48000),
)


def make_clip(rng: np.random.Generator, sr: int) -> tuple[np.ndarray, dict]:
    attrs = {
        "count": int(rng.integers(1, 5)),
        "kind": "tone" if rng.random() < 0.5 else "noise",
        "pitch": "high" if rng.random() < 0.5 else "low",
        "loudness": "loud" if rng.random() < 0.5 else "quiet",
    }
    duration = float(rng.uniform(*CLIP_SECONDS))
    n = int(duration * sr)
    wav = 0.002 * rng.standard_normal(n)
    amp = rng.uniform(0.4, 0.7) if attrs["loudness"] == "loud" else rng.uniform(0.03, 0.06)
    freq = rng.uniform(1800, 2600) if attrs["pitch"] == "high" else rng.uniform(250, 450)
    burst = int(BURST_SECONDS * sr)
    gap = int(GAP_SECONDS * sr)
    slot = n // attrs["count"]
    for k in range(attrs["count"]):
        start = k * slot + int(rng.integers(0, slot - burst - gap + 1))
        t = np.arange(burst) / sr
        if attrs["kind"] == "tone":
            sig = np.sin(2 * np.pi * freq * t)
        else:
            # Noise also carries pitch: white noise band-limited around the centre frequency.
            white = rng.standard_normal(burst)
            spec = np.fft.rfft(white)
            f = np.fft.rfftfreq(burst, 1 / sr)
            spec[np.abs(f - freq) > freq * 0.35] = 0
            sig = np.fft.irfft(spec, burst)
            sig /= np.abs(sig).max() + 1e-9
        ramp = np.minimum(1.0, np.minimum(np.arange(burst), np.arange(burst)[::-1]) / (0.01 * sr))
        wav[start : start + burst] += amp * sig * ramp
    return np.clip(wav, -1, 1).astype(np.float32), attrs


def answers(attrs: dict) -> dict[str, str]:
    return {
        "count": COUNT_WORDS[attrs["count"] - 1],
        "pitch": attrs["pitch"],
        "kind": attrs["kind"],
        "loudness": attrs["loudness"],
    }


def synthesize(out: str, clips: int = 200, test_clips: int = 40, seed: int = 0) -> dict[str, str]:
    """Write audio files plus train.json (GAMA format) and test.json (evaluation format)."""
    if clips < 1 or test_clips < 0:
        raise UsageError(f"need at least one training clip, got clips={clips} test_clips={test_clips}")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    train, test = [], []
    for i in range(clips + test_clips):
        ext, subtype, sr = FORMATS[i % len(FORMATS)]
        wav, attrs = make_clip(rng, sr)
        rel = f"audio/clip_{i:05d}.{ext}"
        soundfile.write(os.path.join(out, rel), wav, sr, subtype=subtype)
        ans = answers(attrs)
        if i < clips:
            for task, forms in QUESTIONS.items():
                question = forms[int(rng.integers(len(forms)))]
                train.append(
                    {
                        "audio_id": rel,
                        "instruction": question,
                        "input": "",
                        "output": ans[task],
                        "dataset": "synth",
                        "task": task,
                    }
                )
        else:
            test.append(
                {
                    "audio_id": rel,
                    "dataset": "synth",
                    "instruction_output": [
                        {"instruction": forms[0], "output": ans[task], "task": task}
                        for task, forms in QUESTIONS.items()
                    ],
                }
            )
    paths = {
        "train": os.path.join(out, "train.json"),
        "test": os.path.join(out, "test.json"),
        "tokenizer": os.path.join(out, "tokenizer"),
    }
    for name, rows in (("train", train), ("test", test)):
        with open(paths[name], "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    write_tokenizer(paths["tokenizer"])
    return paths


def write_tokenizer(folder: str) -> None:
    """Every word the set's prompts and answers can contain, in the training template."""
    from .data.prompts import TEMPLATES
    from .data.tokenizer import word_tokenizer

    texts = [form for forms in TEMPLATES.values() for form in forms.values()]
    texts += [q for forms in QUESTIONS.values() for q in forms]
    texts += list(COUNT_WORDS) + ["high", "low", "tone", "noise", "loud", "quiet"]
    word_tokenizer(texts).save_pretrained(folder)
