"""Helpers shared by the benchmarks: real 10 s clips written with soundfile, and timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np
import soundfile


def write_clips(root: str, n: int, sr: int = 16000, seconds: float = 10.0, ext: str = "wav", seed: int = 0):
    """n clips of tones over noise; returns their paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    paths = []
    t = np.arange(int(seconds * sr)) / sr
    for i in range(n):
        wav = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(t.size)
        path = os.path.join(root, f"clip_{i:05d}.{ext}")
        soundfile.write(path, wav.astype(np.float32), sr, subtype="PCM_16")
        paths.append(path)
    return paths


def write_gama_json(path: str, audio_paths: list[str], qa_per_clip) -> str:
    rows = []
    for i, audio in enumerate(audio_paths):
        for q in range(qa_per_clip(i)):
            rows.append(
                {
                    "audio_id": audio,
                    "instruction": f"Question {q} about this sound?",
                    "input": "",
                    "output": f"An answer of ordinary length, number {q}.",
                    "dataset": "bench",
                    "task": "open",
                }
            )
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Time each callable `repeats` times, alternating them; median seconds per call."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return f"{platform.machine()}, {os.cpu_count()} cores, {python}"
