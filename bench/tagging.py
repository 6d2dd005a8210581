"""Tagger input from stored features versus decoding the audio and running ASTFeatureExtractor.

Both sides produce the tagger's float32 [B, 1024, 128] input_values for the same 10 s clips,
single-threaded: ours reads the shards (`iter_samples`, checked decoding) and renormalises
(gama_ds/tags/feature_rule.py); the baseline decodes each file with soundfile, resamples to
16 kHz when needed (torchaudio, as conversion does) and calls transformers' ASTFeatureExtractor,
which is what a tagger run on the raw audio costs before its model. The model forward is the
same on both sides and is timed once, for scale, on a random AST of the base size (AudioSet's
AST: 12 layers, 768 wide, 1,212 patches). Goal: the input at least 5x cheaper.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import soundfile
import torch
import torchaudio.functional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_clips, write_gama_json  # noqa: E402
from gama_ds.data.convert import ConvertOptions, convert  # noqa: E402
from gama_ds.data.shards import iter_samples, read_index  # noqa: E402
from gama_ds.tags.feature_rule import FeatureRule  # noqa: E402

# ASTFeatureExtractor's defaults, those of MIT/ast-finetuned-audioset-10-10-0.4593.
RULE = FeatureRule(mean=-4.2677393, std=4.5689974, max_length=1024, do_normalize=True)


def ours(root: str, batch: int = 16) -> None:
    fbanks = [s.fbank for e in read_index(root)["shards"] for s in iter_samples(f"{root}/{e['file']}")]
    for i in range(0, len(fbanks), batch):
        RULE.inputs(fbanks[i : i + batch])


def baseline(clips: list[str], extractor, batch: int = 16) -> None:
    for i in range(0, len(clips), batch):
        waves = []
        for path in clips[i : i + batch]:
            data, sr = soundfile.read(path, dtype="float32", always_2d=True)
            wave = torch.from_numpy(data.T.copy())
            if sr != 16000:
                wave = torchaudio.functional.resample(wave, sr, 16000)
            waves.append(wave[0].numpy())
        extractor(waves, sampling_rate=16000, return_tensors="pt")


def interleaved_wall_and_cpu(runs: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per call, the callables alternating: the machine is
    shared, and CPU time is what other load disturbs least."""
    times: dict[str, list] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {n: tuple(statistics.median(x[i] for x in ts) for i in (0, 1)) for n, ts in times.items()}


def model_seconds_per_clip() -> float:
    from transformers import ASTConfig, ASTForAudioClassification

    model = ASTForAudioClassification(ASTConfig(num_labels=527)).eval()
    x = RULE.inputs([torch.zeros(998, 128).numpy()])
    with torch.inference_mode():
        model(input_values=x)  # warm-up
        start = time.perf_counter()
        model(input_values=x)
    return time.perf_counter() - start


def main(n: int = 32, repeats: int = 3) -> None:
    from transformers import ASTFeatureExtractor

    torch.set_num_threads(1)
    extractor = ASTFeatureExtractor()
    print(f"tagger input, {n} clips of 10 s, {machine()}, torch threads 1")
    with tempfile.TemporaryDirectory() as tmp:
        for sr, ext in ((16000, "wav"), (44100, "flac")):
            clips = write_clips(os.path.join(tmp, f"a{sr}"), n, sr=sr, ext=ext)
            src = write_gama_json(os.path.join(tmp, f"{sr}.json"), clips, lambda i: 1)
            out = os.path.join(tmp, f"shards{sr}")
            convert([src], out, ConvertOptions(), workers=1, progress=False, log=lambda m: None)
            t = interleaved_wall_and_cpu(
                {"stored": lambda o=out: ours(o), "decode": lambda c=clips: baseline(c, extractor)}, repeats
            )
            (ours_wall, ours_cpu), (base_wall, base_cpu) = t["stored"], t["decode"]
            print(
                f"  {sr} Hz {ext}: stored features {n / ours_wall:7.1f} clips/s | decode + "
                f"ASTFeatureExtractor {n / base_wall:6.1f} clips/s | ratio {base_wall / ours_wall:5.1f}x "
                f"wall, {base_cpu / ours_cpu:5.1f}x CPU"
            )
    print(f"  for scale: AST-base forward, 1 clip, 1 thread: {model_seconds_per_clip():.2f} s")


if __name__ == "__main__":
    main()
