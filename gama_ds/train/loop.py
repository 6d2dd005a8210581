"""The training loop, top to bottom: recipe -> checks -> model -> stream -> DeepSpeed -> steps.

Runs on every rank, started by `deepspeed`, `torchrun` or as one plain process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..config import ConfigError, Recipe, load_recipe
from ..data.collate import Collator
from ..data.stream import StreamLoader, TrainStream, open_sets
from ..data.tokenizer import load_tokenizer
from ..errors import CheckpointError
from ..exported import load_init
from . import checkpoint
from .distributed import (
    StopSignal,
    _start_resource_tracker_deaf_to_usr1,
    dist_env,
    mean_over_ranks,
    seed_everything,
    start_process_group,
    sum_over_ranks,
)
from .engine import initialize
from .metrics import ExampleTrace, Metrics, device_peak_flops, flops_per_sample, flops_per_token
from .partitioned import build_for_training, gathered_for_init
from .preflight import RUN_FILE, eval_stream_config, preflight, stream_config
from .watchdog import Watchdog

log = logging.getLogger("gama_ds.train")
MODEL_INPUTS = ("fbank", "input_ids", "attention_mask", "labels", "has_audio")


def recipe_hash(recipe: Recipe) -> str:
    """What decides the training trajectory; where it writes, how often it logs or saves, how
    the shard paths are spelled and how many DataLoader workers read them do not count, so a
    moved run still resumes, on any number of ranks and workers."""
    d = asdict(recipe)
    for section in ("logging", "checkpoint"):
        d.pop(section)
    d["train"].pop("output_dir")
    for key in ("eval_every_steps", "heartbeat_timeout_s", "stall_timeout_s", "collective_timeout_s"):
        d["train"].pop(key)
    d["data"].pop("num_workers")
    d["data"].pop("start_method")
    for part in ("train", "eval"):
        d["data"][part] = [dict(s, path=os.path.realpath(s["path"])) for s in d["data"][part]]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate(engine, loader, device, dog: Watchdog) -> float:
    """Held-out loss per supervised token over every held-out example, on any world size."""
    engine.eval()
    loader.stream.epoch, loader.consumed = 0, 0
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in dog.watch(loader, "eval"):
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
            out = engine(**inputs)
            n = (inputs["labels"][:, 1:] != -100).sum()
            # A micro-batch of padding only (the last global batch on many ranks) has no tokens
            # and a NaN loss: it counts for nothing.
            loss = torch.where(n > 0, out.loss.double(), torch.zeros((), dtype=torch.float64, device=device))
            total += torch.stack([loss * n, n.double()])
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def launch_info() -> dict:
    """How this job was started: the launcher's variables, the node list, the code's commit."""
    keys = (
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "SLURM_JOB_ID",
        "SLURM_JOB_NODELIST",
        "SLURM_NNODES",
        "HOSTFILE",
        "NODE_RANK",
    )
    info = {k: os.environ[k] for k in keys if k in os.environ}
    # What the launch scripts forwarded to this rank (on remote nodes: through .deepspeed_env),
    # GAMA_DS_LAUNCH, train.sh's command line, among them.
    info.update({k: v for k, v in os.environ.items() if k.startswith("GAMA_DS_")})
    if os.path.isfile(os.environ.get("HOSTFILE", "")):
        with open(os.environ["HOSTFILE"], encoding="utf-8") as f:
            info["hostfile"] = f.read()
    try:
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        info["commit"] = (
            subprocess.run(
                ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def local_share(model) -> float:
    """The share of the LLM's elements this rank holds: 1 unless ZeRO-3 partitioned it."""
    held = total = 0
    for p in model.llm.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else n
    return held / max(total, 1)


def train(recipe_path: str, overrides: list[str] = (), resume: str | None = None, stop_at: int = 0) -> dict:
    """Train a recipe; `stop_at` stops cleanly after that step as a preemption would."""
    dog = Watchdog()
    try:
        return _train(dog, recipe_path, overrides, resume, stop_at)
    except BaseException as err:
        dog.failed(err)  # every rank on every node hears of it, and ends
        raise


def _train(dog: Watchdog, recipe_path: str, overrides: list[str], resume: str | None, stop_at: int) -> dict:
    # -- 1. the recipe, and every check, before any process group exists
    recipe = load_recipe(recipe_path, list(overrides))
    world, rank, local_rank = dist_env()
    digest = recipe_hash(recipe)
    plan = preflight(recipe, world, resume, digest)
    out_dir, ckpt_dir = recipe.train.output_dir, os.path.join(recipe.train.output_dir, "checkpoints")
    is_main = rank == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")

    # -- 2. processes, seeds, tokenizer, model (built identically on every rank)
    _start_resource_tracker_deaf_to_usr1()  # before anything creates a semaphore
    start_process_group(local_rank, recipe.train.collective_timeout_s)
    dog.start(rank, world, recipe.train.heartbeat_timeout_s, recipe.train.stall_timeout_s)
    seed_everything(recipe.train.seed)
    tokenizer = load_tokenizer(plan.tokenizer)
    recipe.model.llm = plan.llm_source
    if recipe.model.dtype == "float32" and plan.precision == "bf16":
        # DeepSpeed's bf16 mode casts the weights anyway: building in bf16 halves host memory.
        recipe.model.dtype = "bfloat16"
    # ZeRO-3: built partitioned; `zero3_config` must live until deepspeed.initialize (partitioned.py)
    model, zero3_config = build_for_training(
        recipe.model, plan.ds_config, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision)
    )
    if len(tokenizer) > model.llm.config.vocab_size:
        raise ConfigError(
            f"data.tokenizer {plan.tokenizer} has {len(tokenizer)} tokens, the vocabulary of model.llm "
            f"{plan.llm_source} only {model.llm.config.vocab_size}; give the LLM's own tokenizer"
        )
    if recipe.train.init is not None:
        with gathered_for_init(model):
            load_init(model, recipe.train.init)  # a gama-ds export, or a reference checkpoint
        log.info("initialised from %s", recipe.train.init)

    # -- 3. the data: one global order of examples, each rank its micro-batches of every global batch
    d = recipe.data
    collator = Collator(tokenizer, d.cutoff_len, d.template, d.train_on_inputs)
    sets = open_sets([(s.path, s.weight) for s in d.train])
    stream = TrainStream(sets, stream_config(recipe), collator, rank, world, d.num_workers)
    loader = StreamLoader(stream, d.start_method)
    eval_loader = None
    if d.eval:
        eval_sets = open_sets([(s.path, s.weight) for s in d.eval])
        eval_loader = StreamLoader(
            TrainStream(eval_sets, eval_stream_config(recipe, world), collator, rank, world, 0)
        )
    epoch_steps = [loader.batches_in_epoch(e) // plan.accumulation for e in range(recipe.train.epochs)]
    total_steps = recipe.train.max_steps or sum(epoch_steps)

    # -- 4. DeepSpeed, told beforehand whether the checkpoint to resume comes from another world size
    tag = None
    if resume is not None:
        # Rank 0 decides, so that ranks with stale directory listings (NFS) load the same tag.
        choice = [checkpoint.latest_complete(ckpt_dir) if resume == "auto" else resume]
        dist.broadcast_object_list(choice, src=0)
        tag = choice[0]
        if tag is not None:
            checkpoint.prepare_resume(ckpt_dir, tag, world, plan.ds_config)
    engine, scheduler = initialize(model, recipe, plan.ds_config, total_steps)
    device = engine.device
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, RUN_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "recipe_hash": digest,
                    "recipe_path": recipe_path,
                    "overrides": list(overrides),
                    "argv": sys.argv,
                    "world_size": world,
                    "gama_ds": __version__,
                    "deepspeed_config": plan.ds_config,
                    "precision": plan.precision,
                    "recipe": asdict(recipe),
                    "launch": launch_info(),
                    "llm_share_on_rank0": local_share(model),
                },
                f,
                indent=1,
            )

    # -- 5. resume
    step = 0
    if tag is not None:
        state = checkpoint.load(engine, ckpt_dir, tag)
        if state.get("recipe_hash") != digest:
            raise CheckpointError(
                f"{ckpt_dir}/{tag} was written by another recipe; resume with the recipe and "
                "overrides in its run.json, or train into another train.output_dir"
            )
        step = state["step"]
        note = loader.load_state_dict(state["stream"])
        log.info("resumed from %s at step %d%s", tag, step, f" ({note})" if note else "")

    # -- 6. the loop
    metrics = Metrics(out_dir, is_main, recipe.logging.tensorboard, after_step=step)
    trace = ExampleTrace(out_dir, rank, recipe.logging.trace_examples, after_step=step)
    stop = StopSignal()
    audio_tokens = model.num_audio_tokens
    flops_token, flops_sample = flops_per_token(model), flops_per_sample(model)
    peak = device_peak_flops() if plan.precision in ("bf16", "fp16") else None
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not is_main, dynamic_ncols=True)
    loss_sum, window_batches, micro = torch.zeros((), device=device), 0, 0
    tokens, samples, pads, tick = 0, 0, [], time.perf_counter()
    last_saved, stopped, done, bad_samples = step, None, step >= total_steps, 0

    def save(at: int) -> None:
        dog.busy("save")
        client = {"step": at, "stream": loader.state_dict(), "recipe_hash": digest}
        checkpoint.save(engine, ckpt_dir, at, client, recipe.checkpoint.keep)

    while not done:
        for batch in dog.watch(loader):
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
            out = engine(**inputs)
            engine.backward(out.loss)
            engine.step()
            loss_sum += out.loss.detach().float()  # read only when logging: .item() would sync a GPU
            window_batches += 1
            micro += 1
            tokens += int(batch["text_tokens"]) + audio_tokens * len(batch["keys"])
            samples += len(batch["keys"])
            trace.add(batch["keys"])
            bad_samples += int(batch["bad_samples"])
            pads.append(float(batch["pad_fraction"]))
            if micro % plan.accumulation:
                continue
            step += 1  # an optimizer step happened
            bar.update(1)
            trace.step(step)
            if loader.at_epoch_end:
                # A whole epoch: what it held, what was trained on, what was left over.
                bad = int(sum_over_ranks([float(bad_samples)], device)[0])
                counts = loader.epoch_counts(loader.epoch)
                counts["epoch_trained"] -= bad
                metrics.log({"step": step, "epoch": loader.epoch, **counts, "bad_samples": bad})
                bad_samples = 0
            if step % recipe.logging.every_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - tick
                # The stop vote rides along: every rank reads the same mean at the same step.
                window = [loss_sum.item() / window_batches, tokens / elapsed, samples / elapsed]
                loss, tok_s, smp_s, vote = mean_over_ranks([*window, stop.flag()], device)
                if StopSignal.agreed(vote):
                    stopped = stop.received or "a signal on another rank"
                record = {
                    "step": step,
                    "epoch": loader.epoch,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": smp_s * world,
                    "tokens_per_s": tok_s * world,
                    "pad_fraction": float(np.mean(pads)),
                }
                if peak:
                    text_s = tok_s - audio_tokens * smp_s  # per rank: text tokens; audio counted per sample
                    record["mfu"] = (
                        (text_s + audio_tokens * smp_s) * flops_token + smp_s * flops_sample
                    ) / peak
                metrics.log(record)
                bar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{record['samples_per_s']:.1f}"
                )
                loss_sum, window_batches = torch.zeros((), device=device), 0
                tokens, samples, pads, tick = 0, 0, [], time.perf_counter()
            if (
                eval_loader is not None
                and recipe.train.eval_every_steps
                and step % recipe.train.eval_every_steps == 0
            ):
                metrics.log({"step": step, "eval_loss": evaluate(engine, eval_loader, device, dog)})
            if step % recipe.checkpoint.every_steps == 0:
                save(step)
                last_saved = step
            if not stopped and stop_at and step >= stop_at:
                stopped = f"--stop-at {stop_at}"
            if stopped or step >= total_steps:
                done = True
                break

    # -- 7. the end: a last checkpoint, the held-out loss, the curves
    if last_saved != step:
        save(step)
    result = {"step": step, "total_steps": total_steps, "stopped_by": stopped, "output_dir": out_dir}
    if eval_loader is not None and not stopped:
        result["eval_loss"] = evaluate(engine, eval_loader, device, dog)
        metrics.log({"step": step, "eval_loss": result["eval_loss"]})
    bar.close()
    result["plot"] = metrics.close(recipe.logging.plot and not stopped)
    if stopped:
        log.info("stopped by %s at step %d; continue with --resume auto", stopped, step)
    dog.close()
    return result
