"""The training loop, top to bottom: recipe -> checks -> model -> stream -> DeepSpeed -> steps.

Runs on every rank, started by `deepspeed`, `torchrun` or as one plain process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..config import ConfigError, Recipe, load_recipe
from ..data.collate import Collator
from ..data.soft_prompt import init_ids
from ..data.stream import StreamLoader, TrainStream, open_sets
from ..data.tokenizer import load_tokenizer
from ..errors import CheckpointError
from ..exported import load_init
from ..signals import listen_for_stop, start_resource_tracker_deaf_to_stop_signals
from . import checkpoint
from .distributed import (
    StopVote,
    dist_env,
    mean_over_ranks,
    seed_everything,
    start_process_group,
    sum_over_ranks,
)
from .engine import initialize
from .extensions import build_comm_op, extensions_dir
from .held_out import MODEL_INPUTS, HeldOut
from .metrics import ExampleTrace, Metrics, Window, device_peak_flops, flops_per_sample, flops_per_token
from .partitioned import build_for_training, gathered_embeddings, gathered_for_init
from .preflight import eval_stream_config, preflight, stream_config
from .run_record import write_result_file, write_run_file
from .watchdog import Watchdog

log = logging.getLogger("gama_ds.train")


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
    stop = listen_for_stop()  # a signal while the model loads still stops at the first step
    recipe = load_recipe(recipe_path, list(overrides))
    world, rank, local_rank = dist_env()
    digest = recipe_hash(recipe)
    plan = preflight(recipe, world, resume, digest)
    out_dir, ckpt_dir = recipe.train.output_dir, os.path.join(recipe.train.output_dir, "checkpoints")
    is_main = rank == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")

    # -- 2. processes, seeds, tokenizer, model (built identically on every rank)
    start_resource_tracker_deaf_to_stop_signals()  # before anything creates a semaphore
    extensions_dir()  # node-local unless set
    build_comm_op()  # under our lock, not torch's alone (extensions.py)
    start_process_group(local_rank, recipe.train.collective_timeout_s)
    dog.start(rank, world, recipe.train.heartbeat_timeout_s, recipe.train.stall_timeout_s)
    seed_everything(recipe.train.seed)
    tokenizer = load_tokenizer(plan.tokenizer)
    # From here the recipe is what run.json records and `gama-ds export` rebuilds from, in any working
    # directory: every folder it reads is named by absolute path.
    recipe.model.llm, recipe.data.tokenizer = plan.llm_source, plan.tokenizer
    if recipe.train.init is not None:
        recipe.train.init = os.path.abspath(recipe.train.init)
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
    if recipe.model.soft_prompt is not None:  # its stated init rule; an init export's tensor may follow
        with gathered_embeddings(model):
            ids = init_ids(tokenizer, recipe.model.soft_prompt)
            model.soft_prompt.init_from(model.llm.get_input_embeddings().weight, ids)
    if recipe.train.init is not None:
        with gathered_for_init(model):
            load_init(model, recipe.train.init)  # a gama-ds export, or a reference checkpoint
        log.info("initialised from %s", recipe.train.init)

    # -- 3. the data: one global order of examples, each rank its micro-batches of every global batch
    d = recipe.data
    collator = Collator(
        tokenizer, d.cutoff_len, d.template, d.train_on_inputs, soft_prompt=recipe.model.soft_prompt
    )
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
        write_run_file(out_dir, recipe, plan, digest, recipe_path, overrides, world, model)

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

    # -- 6. the loop: a step is `accumulation` micro-batches; metrics, held-out loss and
    # checkpoints each decide for themselves whether this step is theirs
    metrics = Metrics(out_dir, is_main, recipe.logging.tensorboard, after_step=step)
    trace = ExampleTrace(out_dir, rank, recipe.logging.trace_examples, after_step=step)
    peak = device_peak_flops(plan.precision)
    window = Window(device, model.num_audio_tokens, flops_per_token(model), flops_per_sample(model), peak)
    held_out = HeldOut(engine, eval_loader, device, dog, recipe.train.eval_every_steps, metrics)

    def client_state(at: int) -> dict:
        return {"step": at, "stream": loader.state_dict(), "recipe_hash": digest}

    c = recipe.checkpoint
    saver = checkpoint.Saver(
        engine, ckpt_dir, c.every_steps, c.keep, client_state, lambda: dog.busy("save"), saved_at=step
    )
    vote = StopVote(device)
    bar = progress_bar(total_steps, step, is_main)
    stopped, micro = None, 0
    while step < total_steps and not stopped:
        for batch in dog.watch(loader):
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
            out = engine(**inputs)
            engine.backward(out.loss)
            engine.step()
            window.add(batch, out.loss)
            trace.add(batch["keys"])
            micro += 1
            if micro % plan.accumulation:
                continue
            step += 1  # an optimizer step happened
            bar.update(1)
            trace.step(step)
            if loader.at_epoch_end:
                log_epoch(metrics, loader, window, step, device)
            if vote.step(stop.received is not None):
                stopped = stop.received or "a signal on another rank"
            if step % recipe.logging.every_steps == 0 or step == total_steps:
                means = mean_over_ranks(window.rates(), device)
                record = window.record(means, world)
                metrics.log({"step": step, "epoch": loader.epoch, **record, "lr": scheduler.get_last_lr()[0]})
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{record['samples_per_s']:.1f}"
                )
            held_out.step(step)
            saver.step(step)
            if not stopped and stop_at and step >= stop_at:
                stopped = f"--stop-at {stop_at}"
            if stopped or step >= total_steps:
                break

    # -- 7. the end: a last checkpoint, the held-out loss, the curves
    saver.final(step)
    result = {"step": step, "total_steps": total_steps, "stopped_by": stopped, "output_dir": out_dir}
    if not stopped and eval_loader is not None:
        result["eval_loss"] = held_out.log(step)
    bar.close()
    result["plot"] = metrics.close(recipe.logging.plot and not stopped)
    if stopped:
        log.info("stopped by %s at step %d; continue with --resume auto", stopped, step)
    if is_main:
        write_result_file(out_dir, result)
    dog.close()
    return result


def log_epoch(metrics: Metrics, loader, window: Window, step: int, device) -> None:
    """At an epoch's end: what it held, what was trained on, what was left over (all ranks)."""
    bad = int(sum_over_ranks([float(window.bad_samples)], device)[0])
    counts = loader.epoch_counts(loader.epoch)
    counts["epoch_trained"] -= bad
    metrics.log({"step": step, "epoch": loader.epoch, **counts, "bad_samples": bad})
    window.bad_samples = 0


def progress_bar(total: int, initial: int, active: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not active, dynamic_ncols=True)
