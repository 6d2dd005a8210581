"""Checkpoints that count only once complete, and resume from the latest complete one.

A checkpoint is DeepSpeed's own (trainable weights, optimizer and scheduler state, written by
all ranks together, frozen weights excluded since they come from the recipe's init), plus a
client state (step, stream position, recipe hash) and each rank's RNG state. Rank 0 writes
`COMPLETE` into the tag's folder only after every rank has finished writing; a save that
was interrupted has no marker and is never picked by `--resume auto`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CheckpointError

COMPLETE = "COMPLETE"
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


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep: int) -> str:
    """All ranks call this together."""
    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, exclude_frozen_parameters=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(_rng_state(), os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"))
    _barrier()
    if rank == 0:
        marker = os.path.join(ckpt_dir, tag, COMPLETE)
        with open(marker + ".tmp", "w") as f:
            json.dump({"step": step, "recipe": client_state.get("recipe_hash")}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker + ".tmp", marker)
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    _barrier()
    return tag


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the client state."""
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=False)
    if path is None:
        raise CheckpointError(
            f"{ckpt_dir}/{tag}: DeepSpeed found no checkpoint to load there; give a complete tag "
            "(one with a COMPLETE marker) or --resume auto"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    if os.path.exists(rng):  # a different world size has no state for this rank: keep the seed's
        _set_rng_state(torch.load(rng, weights_only=True))
    return client_state
