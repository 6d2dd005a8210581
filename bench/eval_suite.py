"""Evaluation suite throughput: `gama-ds eval --suite` on 2 ranks (torchrun) against 1 process.

Both run the same suite on the same export from scratch (fresh --out, so nothing is kept), one
after the other, in alternating rounds: N real 10 s clips, LTU's fixed caption prompt, greedy,
a fixed number of new tokens. Prints rows/s and the ratio for answering (the set's seconds in
the report: generating and gathering, after start-up) and for the whole command (with each
process's start-up, as a user's job has it). Goal on 2 cores, answering: at least 1.5x (each
rank has one core; the ranks share nothing but the gathers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import build_export  # noqa: E402

from common import machine, write_clips  # noqa: E402

PROMPT = "Close-ended question: Write an audio caption describing the sound."
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(export: str, suite: str, out: str, ranks: int) -> tuple[float, float]:
    """(wall seconds of the command, seconds of the set: answering and gathering, no start-up)"""
    command = ["-m", "gama_ds", "eval", "--model", export, "--suite", suite, "--out", out, "--json"]
    if ranks > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *command]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s): exit {done.returncode}: {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["world_size"] == ranks and report["sets"][0]["generated"] == report["sets"][0]["rows"]
    return seconds, report["sets"][0]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=192)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = build_export(os.path.join(tmp, "export"), "small")
        clips = write_clips(os.path.join(tmp, "audio"), args.clips)
        rows = [{"audio_id": c, "output": "a tone over noise"} for c in clips]
        with open(os.path.join(tmp, "eval.json"), "w") as f:
            json.dump(rows, f)
        suite = os.path.join(tmp, "suite.yaml")
        with open(suite, "w") as f:
            f.write("batch_size: 8\nnum_workers: 0\n")
            f.write(f"generation: {{do_sample: false, max_new_tokens: {args.tokens}}}\n")
            f.write(
                "datasets: [{dataset: clothoaqa, name: clips, eval: eval.json, prompt: "
                + repr(PROMPT)
                + "}]\n"
            )
        times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        for r in range(args.rounds):
            for ranks in (1, 2):
                times[ranks].append(run(export, suite, os.path.join(tmp, f"out{r}-{ranks}"), ranks))
    print(f"eval --suite, {args.clips} clips x {args.tokens} greedy tokens, {machine()}")
    ratios = []
    for k, what in ((1, "answering"), (0, "whole command")):
        one = statistics.median(t[k] for t in times[1])
        two = statistics.median(t[k] for t in times[2])
        ratios.append(one / two)
        print(f"  {what:<13}: 1 process {one:6.1f} s ({args.clips / one:5.2f} rows/s), "
              f"2 ranks {two:6.1f} s ({args.clips / two:5.2f} rows/s): {one / two:.2f}x")  # fmt: skip
    print(f"  ratio 2 ranks / 1 process, answering: {ratios[0]:.2f}x (goal >= 1.5x)")


if __name__ == "__main__":
    main()
