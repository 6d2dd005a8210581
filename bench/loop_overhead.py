"""Loop overhead: steps/s of `gama-ds train` versus a bare DeepSpeed loop, same model and batches.

One process, the tiny recipe on CPU (fp32, ZeRO-2, global batch 16 = 4 micro-batches of 4).
Ours: `gama_ds.train.loop.train` with its stream (one DataLoader worker), metrics, progress bar
and checks, timed from its own per-step metrics after the first 3 steps. Bare: the same model,
DeepSpeed config and optimizer over the same batches already in memory: forward, backward,
step, nothing else. Alternated twice. Goal: within 5%.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

STEPS = 24


def ours(tmp: str, shards: str, run: int) -> float:
    from gama_ds.train.loop import train

    out = os.path.join(tmp, f"ours{run}")
    train(
        "tiny",
        [
            f"data.train=[{{path: {shards}}}]",
            f"train.output_dir={out}",
            f"train.max_steps={STEPS}",
            "logging.every_steps=1",
            "logging.tensorboard=false",
            "logging.plot=false",
            "checkpoint.every_steps=1000",
            "train.epochs=10",
        ],
    )
    rates = [json.loads(line)["samples_per_s"] for line in open(os.path.join(out, "metrics.jsonl"))][3:]
    return statistics.median(rates) / 16  # steps/s


def bare(shards: str) -> float:
    import deepspeed
    import torch

    from gama_ds.config import load_recipe
    from gama_ds.data.collate import Collator
    from gama_ds.data.stream import StreamConfig, StreamLoader, TrainStream, open_sets
    from gama_ds.data.tokenizer import byte_tokenizer
    from gama_ds.model.build import build_model
    from gama_ds.train.engine import build_optimizer, resolve_ds_config

    recipe = load_recipe("tiny", [f"data.train=[{{path: {shards}}}]"])
    torch.manual_seed(0)
    model = build_model(recipe.model)
    collator = Collator(byte_tokenizer(), recipe.data.cutoff_len)
    d = recipe.data
    cfg = StreamConfig(
        micro_batch=4, global_batch=16, shuffle_buffer=d.shuffle_buffer, bucket_batches=d.bucket_batches
    )
    stream = TrainStream(open_sets([(shards, 1.0)]), cfg, collator, 0, 1, 0)
    loader = StreamLoader(stream)
    epochs = itertools.chain.from_iterable(loader for _ in range(10))  # as ours: train.epochs=10
    batches = list(itertools.islice(epochs, STEPS * 4))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, recipe, False), config=resolve_ds_config(recipe, 1)
    )
    keys = ("fbank", "input_ids", "attention_mask", "labels", "has_audio")
    times = []
    for i in range(0, len(batches), 4):
        start = time.perf_counter()
        for batch in batches[i : i + 4]:
            out = engine(**{k: batch[k] for k in keys})
            engine.backward(out.loss)
            engine.step()
        times.append(time.perf_counter() - start)
    return 1 / statistics.median(times[3:])


def main() -> None:
    from gama_ds.data.convert import ConvertOptions, convert
    from gama_ds.synth import synthesize

    print(f"loop overhead, tiny recipe on CPU, {STEPS} steps of 16 samples, {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = synthesize(os.path.join(tmp, "audio"), clips=48, test_clips=0)
        shards = os.path.join(tmp, "shards")
        convert(
            [data["train"]],
            shards,
            ConvertOptions(shard_samples=6),
            workers=1,
            progress=False,
            log=lambda m: None,
        )
        results = {"gama-ds train": [], "bare DeepSpeed": []}
        for run in range(2):
            results["gama-ds train"].append(ours(tmp, shards, run))
            results["bare DeepSpeed"].append(bare(shards))
        for name, rates in results.items():
            each = ", ".join(f"{r:.2f}" for r in rates)
            print(f"  {name:15}: {statistics.median(rates):.2f} steps/s ({each})")
        ratio = statistics.median(results["gama-ds train"]) / statistics.median(results["bare DeepSpeed"])
        print(f"  ratio gama-ds / bare: {ratio:.3f} ({100 * (1 - ratio):+.1f}% overhead)")


if __name__ == "__main__":
    main()
