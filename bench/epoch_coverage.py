"""Epoch coverage: examples left over per epoch, and plan-building time, at cluster sizes.

1,000 shards of 3,000-6,000 QA pairs (about 3.8 per clip, OpenAQA's ratio), global batch 256,
micro-batch 4, at 8x4, 32x4, 64x4 and 128x8 ranks x DataLoader workers. Side by side:

- before: the plan that gama_ds had until issue 12, re-stated here as the baseline: shards
  dealt whole to the ranks x workers readers greedily by QA count, every reader cut to the
  smallest reader's count in whole micro-batches, each rank's batches to a multiple of the
  accumulation; it refused to run with fewer shards than readers;
- now: `data/plan.py`'s global order, which does not depend on the readers at all: an epoch
  trains on whole global batches and leaves fewer than one over.

Also the time to build the plan for 10,000 shards (goal: under a second), which every rank
and worker does at the start of every epoch. No shard files are needed: plans read indexes only.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402
from gama_ds.data.plan import EpochPlan  # noqa: E402
from gama_ds.data.stream import ShardSet, StreamConfig  # noqa: E402

GLOBAL, MICRO = 256, 4
SIZES = [(8, 4), (32, 4), (64, 4), (128, 8)]


def fake_set(shards: int, seed: int = 0) -> ShardSet:
    """Index entries like `gama-ds convert` writes, without the shard files."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(shards):
        qa = int(rng.integers(3000, 6001))
        per = np.full(qa // 4, 4)
        per[: qa - per.sum()] += 1  # about 3.8-4 QA pairs per clip, summing to qa exactly
        entries.append({"file": f"shard-{i:06d}.tar", "qa_pairs": qa, "qa_per_sample": per.tolist()})
    return ShardSet(f"/fake/{shards}", 1.0, entries)


def before(s: ShardSet, world: int, workers: int) -> int:
    """Examples the pre-issue-12 plan trained on in one epoch."""
    readers = world * workers
    counts = np.zeros(readers, dtype=np.int64)
    for shard in np.random.default_rng(0).permutation(len(s.shards)):
        counts[int(np.argmin(counts))] += s.shards[shard]["qa_pairs"]
    per_reader = int(counts.min()) // MICRO
    accumulation = GLOBAL // (MICRO * world) or 1
    rank_batches = (per_reader * workers) // accumulation * accumulation
    return rank_batches * MICRO * world


def build(s: ShardSet) -> EpochPlan:
    """What a rank does at an epoch's start: the plan, its first pass's lanes, global batch 0."""
    plan = EpochPlan([s], StreamConfig(micro_batch=MICRO, global_batch=GLOBAL, bucket_batches=1), 0)
    plan.micro_batches(0, length=None)
    return plan


def main() -> None:
    print(f"# epoch coverage, {machine()}")
    s = fake_set(1000)
    total = s.examples(0)
    plan = build(s)
    print(f"1,000 shards, {total:,} examples, global batch {GLOBAL}, micro-batch {MICRO}")
    print(f"{'ranks x workers':>16} {'before: left over':>20} {'now: left over':>18} {'before/now':>7}")
    for world, workers in SIZES:
        new = plan.left_over  # the same on every world size
        now = f"{new:>8,} ({new / total:6.3%})"
        if world * workers > len(s.shards):
            print(f"{world:>7} x {workers:<6} {'refused: < 1 shard each':>20} {now}")
            continue
        old = total - before(s, world, workers)
        print(f"{world:>7} x {workers:<6} {old:>10,} ({old / total:6.2%}) {now} {old / max(new, 1):>6.0f}x")
    big = fake_set(10_000, seed=1)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        build(big)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    before(big, 64, 4)
    old_time = time.perf_counter() - t
    print(
        f"plan for 10,000 shards ({big.examples(0):,} examples): {min(times):.3f} s now "
        f"(goal < 1 s), {old_time:.3f} s before"
    )


if __name__ == "__main__":
    main()
