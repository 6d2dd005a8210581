"""`gama-ds demo`: the whole path on a laptop CPU, with nothing to download.

synthesise audio QA -> convert to shards -> warm the tiny CAV-MAE up on the clips (the demo's
stand-in for a pretrained encoder, gama_ds/warmup.py) -> train the demo recipe from it with the
DeepSpeed launcher on 2 CPU ranks (ZeRO-2) -> export -> evaluate on held-out clips -> answer a
few questions from the raw audio files. Every step but the warm-up is the command a user would
run; the demo only chains them.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time

import torch

from .data.convert import ConvertOptions, convert, summary
from .errors import GamaDsError
from .synth import synthesize


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of the children it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def deepspeed_launcher() -> list[str]:
    """The `deepspeed` console script of this environment (the one next to our Python)."""
    here = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    found = here if os.path.exists(here) else shutil.which("deepspeed")
    if found is None:
        raise GamaDsError("the deepspeed launcher is not installed in this environment")
    return [found]


def pretrain_encoder(
    args: list[str], shards: dict, out: str, steps: int, seed: int, threads: int, log
) -> dict:
    """Build the demo stage's model exactly as training will (same recipe, same seed), warm its
    encoder up, and write it as the export the stage initialises from (`train.init`)."""
    from .config import load_recipe
    from .model.build import build_model
    from .train.distributed import seed_everything
    from .train.export import write_export
    from .warmup import warm_up

    recipe = load_recipe(args[0], args[1:])  # loading does not look for train.init; building neither
    seed_everything(recipe.train.seed)
    model = build_model(recipe.model)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # one process on the cores the ranks will share
    try:
        accuracy = warm_up(model, shards["train"], shards["test"], steps=steps, seed=seed, log=log)
    finally:
        torch.set_num_threads(before)
    log(f"[demo] encoder alone, held-out accuracy by task: {accuracy}")
    write_export(model, recipe, out, source={"warm_up": {"shards": shards["train"], "steps": steps}})
    return accuracy


def run_demo(
    out: str = "demo_run",
    clips: int = 400,
    test_clips: int = 60,
    epochs: int = 6,
    ranks: int = 2,
    warmup_steps: int = 700,
    min_accuracy: float = 0.9,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    log=print,
) -> dict:
    """Run the demo into `out`; returns its summary (also written to out/demo.json)."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    cpu_before = [cpu_seconds()]

    def lap(name: str, t0: float) -> None:
        # Wall time and the CPU time of this process and the children it waited for (the ranks):
        # on a shared machine the wall time says how busy it was, the CPU time what the step costs.
        timings[name] = round(time.perf_counter() - t0, 1)
        now = cpu_seconds()
        cpu_timings[name] = round(now - cpu_before[0], 1)
        cpu_before[0] = now
        log(f"[demo] {name}: {timings[name]} s ({cpu_timings[name]} s of CPU)")

    t0 = time.perf_counter()
    data = os.path.join(out, "data")
    paths = synthesize(data, clips=clips, test_clips=test_clips, seed=seed)
    lap("synthesise", t0)

    t0 = time.perf_counter()
    shards = {}
    threads = torch.get_num_threads()
    # Every rank's DataLoader worker needs a shard of its own in each set. The few held-out clips
    # are converted in this process (the same bytes): spawning the pool's workers, each importing
    # torch, would cost more than their features.
    for name, per_shard, workers in (
        ("train", max(1, clips // 8), None),
        ("test", max(1, test_clips // (2 * ranks)), 1),
    ):
        shards[name] = os.path.join(out, "shards", name)
        options = ConvertOptions(shard_samples=per_shard, order="input" if name == "test" else "shuffle")
        result = convert(
            [paths[name]], shards[name], options, workers, overwrite=True, progress=False, log=lambda m: None
        )
        torch.set_num_threads(threads)  # converting in this process left torch on one thread
        log(f"[demo] {name}: {summary(result).splitlines()[0]}")
        if result.failed:
            raise GamaDsError(f"conversion of {paths[name]} failed; see {shards[name]}/rejects.jsonl")
    lap("convert", t0)

    t0 = time.perf_counter()
    run_dir = os.path.join(out, "run")
    encoder_dir = os.path.join(out, "encoder")
    args = [
        "demo",
        f"data.train=[{{path: {shards['train']}}}]",
        f"data.eval=[{{path: {shards['test']}}}]",
        f"data.tokenizer={paths['tokenizer']}",
        f"train.epochs={epochs}",
        f"train.seed={seed}",
        f"train.output_dir={run_dir}",
        f"train.init={encoder_dir}",
        *overrides,
    ]
    warm_accuracy = pretrain_encoder(args, shards, encoder_dir, warmup_steps, seed, ranks, log)
    lap("warm-up", t0)

    t0 = time.perf_counter()
    command = [
        *deepspeed_launcher(),
        "--num_gpus", str(ranks),
        "--master_port", str(free_port()),
        "--module", "gama_ds.train",
        *args,
    ]  # fmt: skip
    log("[demo] " + " ".join(command))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise GamaDsError(f"training exited with {done.returncode}; the run directory is {run_dir}")
    lap("train", t0)

    t0 = time.perf_counter()
    from .exported import load_export
    from .train.export import export

    export_dir = os.path.join(out, "export")
    export(run_dir, export_dir)
    lap("export", t0)

    t0 = time.perf_counter()
    from .infer import evaluate, generate
    from .report import report_table

    model, tokenizer, info = load_export(export_dir, device="cpu", dtype="fp32")  # as the ranks trained
    prompt = info["prompt"]
    result = evaluate(
        model,
        tokenizer,
        [shards["test"]],
        prompt["cutoff_len"],
        prompt["template"],
        batch_size=32,
        max_new_tokens=4,
        metrics=("loss", "exact", "classify"),
        train_on_inputs=prompt["train_on_inputs"],
    )
    log(report_table(result))
    with open(paths["test"], encoding="utf-8") as f:
        held_out = json.load(f)[:2]
    files = [os.path.join(data, row["audio_id"]) for row in held_out for _ in row["instruction_output"]]
    qas = [{**qa, "input": ""} for row in held_out for qa in row["instruction_output"]]
    answers = generate(model, tokenizer, files, qas, prompt["template"], max_new_tokens=4, do_sample=False)
    for path, qa, answer in zip(files, qas, answers, strict=True):
        log(f"[demo] {os.path.basename(path)}: {qa['instruction']} -> {answer!r} (truth: {qa['output']!r})")
    lap("evaluate", t0)

    summary_ = {
        "accuracy": result["exact_match"],
        "warm_up_accuracy_by_task": warm_accuracy,
        "accuracy_by_task": result["exact_match_by_task"],
        "eval_loss": result["loss"],
        "min_accuracy": min_accuracy,
        "passed": result["exact_match"] >= min_accuracy,
        "seconds": round(time.perf_counter() - started, 1),
        "timings": timings,
        "cpu_seconds": cpu_timings,
        "clips": clips,
        "test_clips": test_clips,
        "epochs": epochs,
        "warmup_steps": warmup_steps,
        "ranks": ranks,
        "export": export_dir,
    }
    with open(os.path.join(out, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(summary_, f, indent=1)
    verdict = "PASS" if summary_["passed"] else "BELOW TARGET"
    log(
        f"[demo] held-out accuracy {100 * summary_['accuracy']:.1f}% (target {100 * min_accuracy:.0f}%: "
        f"{verdict}) in {summary_['seconds']} s; export in {export_dir}"
    )
    return summary_
