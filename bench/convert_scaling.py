"""Conversion throughput: clips/s with 1 and with 2 worker processes, and the scaling ratio.

Same 10 s clips (44.1 kHz flac, so each clip is decoded, resampled and featurised), same
command, fresh output each time; the two runs alternate so machine noise hits both.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, machine, write_clips, write_gama_json  # noqa: E402
from gama_ds.data.convert import ConvertOptions, convert  # noqa: E402


def main(n: int = 480, repeats: int = 2) -> None:
    print(f"conversion, {n} clips of 10 s at 44.1 kHz flac, {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        clips = write_clips(os.path.join(tmp, "audio"), n, sr=44100, ext="flac")
        src = write_gama_json(os.path.join(tmp, "in.json"), clips, lambda i: 4)

        steady: dict[str, list[float]] = {"1 worker": [], "2 workers": []}

        def run(workers, name):
            def go():
                out = os.path.join(tmp, f"out{workers}")
                shutil.rmtree(out, ignore_errors=True)
                r = convert(
                    [src],
                    out,
                    ConvertOptions(shard_samples=16),
                    workers=workers,
                    progress=False,
                    log=lambda m: None,
                )
                steady[name].append((r.clips_done - 1) / (r.elapsed - r.first_clip))

            return go

        t = interleaved({"1 worker": run(1, "1 worker"), "2 workers": run(2, "2 workers")}, repeats)
        rate = {name: statistics.median(v) for name, v in steady.items()}
        for name, secs in t.items():
            print(
                f"  {name}: {n / secs:6.1f} clips/s overall ({secs:.2f} s), "
                f"{rate[name]:6.1f} clips/s after the first clip"
            )
        print(
            f"  scaling 2 vs 1 workers: {t['1 worker'] / t['2 workers']:.2f}x overall, "
            f"{rate['2 workers'] / rate['1 worker']:.2f}x after start-up"
        )


if __name__ == "__main__":
    main()
