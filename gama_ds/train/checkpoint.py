"""Checkpoints that count only once complete, and resume from the latest complete one, on any
number of ranks.

A checkpoint is DeepSpeed's own (trainable weights, optimizer and scheduler state, written by
all ranks together, frozen weights excluded since they come from the recipe's init), plus a
client state (step, stream position, recipe hash) and each rank's RNG state. Rank 0 writes
`COMPLETE`, which records the world size, into the tag's folder only after every rank has
finished writing; a save that was interrupted has no marker and is never picked by
`--resume auto`.

DeepSpeed partitions the optimizer state by rank, so its own loader refuses another world size.
A checkpoint written by N ranks and resumed on M != N is converted once, by rank 0, into
DeepSpeed's universal form (`ds_to_universal`: one folder per parameter holding its full fp32
weight, Adam moments and step) in the tag's `universal/` folder, and DeepSpeed loads that with
`checkpoint.load_universal`, each rank taking its own partition. Same world size: DeepSpeed's
own files, as written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CheckpointError

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"  # the tag's world-size-free copy, made on the first resume on another size
# Ours, next to the output folder, once the conversion's files are durable (DeepSpeed's own
# `latest_universal` comes before any fsync).
_UNIVERSAL_DONE = "universal.COMPLETE"
_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_00_optim_states\.pt$")
log = logging.getLogger("gama_ds.train")
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [
        t
        for t in os.listdir(ckpt_dir)
        if _TAG.match(t) and os.path.exists(os.path.join(ckpt_dir, t, COMPLETE))
    ]
    return sorted(tags)


def latest_complete(ckpt_dir: str) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _fsync(path: str) -> None:
    """A file's data, or a folder's entries, on stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_share(folder: str, rank: int, world: int) -> None:
    """This rank's share of the folder's files, once every rank has written its own: on a local
    disk fsync flushes a file whoever wrote it; Lustre and GPFS sync on any client's request,
    and NFS clients commit their writes on close."""
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    for name in names[rank::world]:
        _fsync(os.path.join(folder, name))


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep: int) -> str:
    """All ranks call this together. `COMPLETE` is written only once every file of the tag and
    the folder's entries are on stable storage, so that a node that crashes never leaves a
    marker over a torn file; the marker is itself written to a temporary name, fsynced, renamed,
    and the folder fsynced again."""
    tag = tag_for(step)
    folder = os.path.join(ckpt_dir, tag)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, exclude_frozen_parameters=True)
    rank = _rank()
    torch.save(_rng_state(), os.path.join(folder, f"rng_rank{rank}.pt"))
    _barrier()  # every rank's files written
    _fsync_share(folder, rank, _world())
    _barrier()  # and durable
    if rank == 0:
        _fsync(folder)  # the files' entries
        _fsync(ckpt_dir)  # the tag's own entry, and DeepSpeed's `latest`
        marker = os.path.join(folder, COMPLETE)
        with open(marker + ".tmp", "w") as f:
            json.dump({"step": step, "recipe": client_state.get("recipe_hash"), "world_size": _world()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker + ".tmp", marker)
        _fsync(folder)  # the rename
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    _barrier()
    return tag


class Saver:
    """Decides for itself when a checkpoint is due (every `every_steps`, and at the end when the
    last step is not saved yet); `client_state(step)` gives what the engine's state lacks."""

    def __init__(self, engine, ckpt_dir, every_steps, keep, client_state, before=None, saved_at=None):
        """`saved_at`: the step of the checkpoint this run resumed from, already saved."""
        self.engine, self.ckpt_dir, self.every, self.keep = engine, ckpt_dir, every_steps, keep
        self.client_state, self.before = client_state, before or (lambda: None)
        self.last = saved_at

    def step(self, step: int) -> None:
        if step % self.every == 0:
            self.save(step)

    def final(self, step: int) -> None:
        if self.last != step:
            self.save(step)

    def save(self, step: int) -> None:
        self.before()
        save(self.engine, self.ckpt_dir, step, self.client_state(step), self.keep)
        self.last = step


def saved_world_size(ckpt_dir: str, tag: str) -> int:
    """The number of ranks that wrote `tag`: its marker says so; older checkpoints, whose marker
    does not, have one ZeRO optimizer file per rank."""
    folder = os.path.join(ckpt_dir, tag)
    marker = os.path.join(folder, COMPLETE)
    if not os.path.exists(marker):
        raise CheckpointError(
            f"{folder} is not a complete checkpoint (no {COMPLETE} marker: its save was interrupted); "
            f"complete ones: {', '.join(complete_tags(ckpt_dir)) or 'none'}"
        )
    try:
        with open(marker, encoding="utf-8") as f:
            recorded = json.load(f).get("world_size")
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{marker}: {err}") from err
    if recorded is not None:
        return int(recorded)
    count = sum(1 for name in os.listdir(folder) if _OPTIM_FILE.match(name))
    if count == 0:
        raise CheckpointError(
            f"{folder}: no ZeRO optimizer files, so the world size that wrote it is unknown"
        )
    return count


def _to_universal(folder: str) -> None:
    """DeepSpeed's converter, in this process: `folder`'s per-rank files -> `folder`/universal."""
    from deepspeed.checkpoint import ds_to_universal

    out = os.path.join(folder, UNIVERSAL)
    shutil.rmtree(out, ignore_errors=True)  # an earlier conversion that died half-way
    args = argparse.Namespace(
        input_folder=folder,
        output_folder=out,
        # Worker processes forked from a rank inherit its process group and threads: convert in-process.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2 checkpoints of a model without tensor parallelism lack the (empty) universal
        # info the converter insists on; ZeRO-3's path does not need it.
        inject_missing_state=True,
    )
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        ds_to_universal.main(args)
    log.debug(chatter.getvalue())
    for root, _dirs, files in os.walk(out, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)
    _fsync(folder)
    with open(os.path.join(folder, _UNIVERSAL_DONE), "w") as f:
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)


def prepare_resume(ckpt_dir: str, tag: str, world_size: int, ds_config: dict) -> None:
    """All ranks, before `deepspeed.initialize`: if `tag` was written by another world size,
    rank 0 converts it (once; a later resume reuses the conversion) and `ds_config` is told to
    load the universal form. Any rank's failure raises on every rank, naming the checkpoint."""
    saved = saved_world_size(ckpt_dir, tag)
    if saved == world_size:
        return
    folder = os.path.join(ckpt_dir, tag)
    error = None
    if _rank() == 0 and not os.path.exists(os.path.join(folder, _UNIVERSAL_DONE)):
        started = time.perf_counter()
        try:
            _to_universal(folder)
            log.info(
                "%s was written by %d ranks, this run has %d: converted to DeepSpeed's universal "
                "checkpoint in %.1f s",
                folder,
                saved,
                world_size,
                time.perf_counter() - started,
            )
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            error = f"{folder}: converting the {saved}-rank checkpoint for {world_size} ranks failed: {err!r}"
    if dist.is_available() and dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise CheckpointError(error)
    ds_config.setdefault("checkpoint", {})["load_universal"] = True


def _own_step_tensors(optimizer) -> None:
    """Each parameter its own Adam step tensor, where torch's AdamW keeps it: beside its moments
    (on the GPU, in fp32) for the fused kernel, which refuses a step on another device, as torch's
    own `load_state_dict` places it; the universal loader leaves it where it was read. The states
    are walked, not the groups' params: ZeRO-3 puts its partitions into the groups only while it
    steps."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    for state in optimizer.state.values():
        step = state.get("step")
        if not torch.is_tensor(step):
            continue
        moment = state.get("exp_avg")
        if on_device and torch.is_tensor(moment):
            state["step"] = step.to(moment.device, torch.float32)
        if state["step"] is step:
            state["step"] = step.clone()


def _fresh_rng_state(ckpt_dir: str, tag: str, rank: int) -> None:
    """A rank the checkpoint did not have (resumed on more ranks than wrote it): a state of its
    own, derived from rank 0's saved state and this rank, so that a rerun draws the same."""
    base = torch.load(os.path.join(ckpt_dir, tag, "rng_rank0.pt"), weights_only=True)["torch"]
    digest = hashlib.sha256(base.numpy().tobytes() + rank.to_bytes(4, "little")).digest()
    seed = int.from_bytes(digest[:4], "little")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the client state.

    RNG: rank r takes the state rank r saved; a rank beyond the saved world size takes a fresh
    state derived from rank 0's (see `_fresh_rng_state`)."""
    if engine.load_universal_checkpoint():  # set by prepare_resume: another world size wrote it
        path, client_state = engine.load_checkpoint(
            os.path.join(ckpt_dir, tag), tag=UNIVERSAL, load_module_strict=False
        )
        # Two slips of ZeRO-3's universal loader (DeepSpeed 0.19.8), undone here. It gives every
        # parameter group the first group's hyperparameters (ours differ in the learning rate
        # only, which the restored scheduler knows per group), and it hands every partition the
        # same step tensor, which torch's Adam then advances in place once per group and step.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        _own_step_tensors(engine.optimizer.optimizer)
    else:
        path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=False)
    if path is None:
        raise CheckpointError(
            f"{ckpt_dir}/{tag}: DeepSpeed found no checkpoint to load there; give a complete tag "
            "(one with a COMPLETE marker) or --resume auto"
        )
    rank = _rank()
    rng = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        _fresh_rng_state(ckpt_dir, tag, rank)
    return client_state
