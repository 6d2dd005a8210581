"""Save time: how long a 7B LoRA stage's checkpoint takes to reach stable storage, the figure a
SIGTERM save must fit into (Slurm's KillWait, 30 s by default; DeepSpeed's launcher's 30 s).

What a checkpoint holds per rank is counted, not guessed: the stage 3/4/5 recipes' models are
built on the meta device (Llama-2-7B shapes, no weights) and their trainable parameters counted.
DeepSpeed writes, with frozen weights excluded, the trainable weights in 16-bit (ZeRO-2: rank 0,
whole; ZeRO-3: each rank its partition) and per rank its partition of the fp32 master weights and
both Adam moments (12 bytes per trainable parameter over the world size).

This machine's `torch.save` throughput is measured on a state of the largest rank's size (ZeRO-2
rank 0 at 8 GPUs) into --dir, with and without fsync (our checkpoints fsync every file before
COMPLETE); the seconds per rank and per node follow from it. Run it with --dir on the cluster's
checkpoint file system for that site's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402
from gama_ds.config import load_recipe  # noqa: E402
from gama_ds.model.estimate import build_on_meta  # noqa: E402
from gama_ds.model.weights import count_parameters  # noqa: E402

STAGES = ("stage3", "stage4", "stage5")
WORLDS = (8, 64)
GPUS_PER_NODE = 8
GB = 1e9


def trainable_counts() -> dict[str, int]:
    counts, seen = {}, {}
    for stage in STAGES:
        model_cfg = load_recipe(stage, []).model
        key = repr(model_cfg)
        if key not in seen:  # stages that train the same modules share one count
            seen[key] = sum(c["trainable"] for c in count_parameters(build_on_meta(model_cfg)).values())
        counts[stage] = seen[key]
    return counts


def per_rank_bytes(trainable: int, stage: int, world: int) -> dict[str, float]:
    """Bytes the busiest rank writes, and the whole job."""
    optim = 12 * trainable / world  # fp32 master + exp_avg + exp_avg_sq, this rank's partition
    weights = 2 * trainable  # the 16-bit trainable weights
    busiest = optim + (weights if stage == 2 else weights / world)
    return {"busiest_rank": busiest, "job": 12 * trainable + weights}


def state_of(nbytes: int) -> dict[str, torch.Tensor]:
    """fp32 tensors of about 64 MB each, as DeepSpeed's flat partitions are a few large ones."""
    n = nbytes // 4
    chunk = 16 * 2**20
    return {f"t{i}": torch.randn(min(chunk, n - i * chunk)) for i in range((n + chunk - 1) // chunk)}


def save(state, path: str, durable: bool) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if not durable:
        return
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def timed_saves(state, folder: str, repeats: int) -> dict[str, float]:
    """Median seconds of a save without and with fsync, alternated. Each save writes a new file,
    as a checkpoint does, and starts with nothing dirty in the page cache: rewriting one file in
    place would make ext4 flush the old data on truncation (auto_da_alloc), and the kernel
    throttles writers behind an earlier save's dirty pages, either of which would time the
    baseline's writeback too."""
    times: dict[str, list[float]] = {"no_fsync": [], "fsync": []}
    for i in range(repeats):
        for name in times:
            path = os.path.join(folder, f"{name}-{i}.pt")
            os.sync()
            started = time.perf_counter()
            save(state, path, name == "fsync")
            times[name].append(time.perf_counter() - started)
            os.sync()
            os.remove(path)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    counts = trainable_counts()
    size = int(per_rank_bytes(max(counts.values()), 2, WORLDS[0])["busiest_rank"])
    print(f"save time, a {size / GB:.2f} GB state (ZeRO-2 rank 0 at {WORLDS[0]} GPUs), {machine()}")
    state = state_of(size)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        times = timed_saves(state, tmp, args.repeats)
        path = os.path.join(tmp, "load.pt")
        save(state, path, True)
        started = time.perf_counter()
        torch.load(path, weights_only=True)
        load_s = time.perf_counter() - started
    rate = size / times["fsync"]
    print(
        f"  torch.save, page cache only : {times['no_fsync']:6.2f} s ({size / times['no_fsync'] / GB:.2f} "
        "GB/s)"
    )
    print(f"  torch.save + fsync          : {times['fsync']:6.2f} s ({rate / GB:.2f} GB/s)")
    print(f"  ratio fsync / no fsync      : {times['fsync'] / times['no_fsync']:.2f}x")
    print(f"  torch.load (page cache)     : {load_s:6.2f} s")
    rows = []
    for stage, trainable in counts.items():
        for zero in (2, 3):
            for world in WORLDS:
                b = per_rank_bytes(trainable, zero, world)
                # One node's ranks share its disk (or its link to the file system).
                ranks = min(world, GPUS_PER_NODE)
                weights = 2 * trainable if zero == 2 else ranks * 2 * trainable / world
                node = ranks * 12 * trainable / world + weights
                row = {
                    "stage": stage,
                    "trainable": trainable,
                    "zero": zero,
                    "world": world,
                    "busiest_rank_gb": round(b["busiest_rank"] / GB, 3),
                    "node_gb": round(node / GB, 3),
                    "job_gb": round(b["job"] / GB, 3),
                    "node_s_at_measured_rate": round(node / rate, 1),
                }
                rows.append(row)
                print(
                    f"  {stage} ({trainable / 1e6:.1f}M trainable) ZeRO-{zero} {world:2d} GPUs: busiest rank "
                    f"{row['busiest_rank_gb']:.2f} GB, a node {row['node_gb']:.2f} GB -> "
                    f"{row['node_s_at_measured_rate']:.1f} s at {rate / GB:.2f} GB/s"
                )
    print("  " + json.dumps({"state_bytes": size, **times, "load_s": load_s, "rows": rows[:4]}))


if __name__ == "__main__":
    main()
