"""`python -m gama_ds.train` as it is, and after every checkpoint save and load, what the engine
then holds, gathered from all ranks: each trainable parameter's fp32 weight and Adam moments,
the optimizer's step counts and each group's learning rate. Rank 0 writes them next to the
checkpoints, to OUTPUT_DIR/dumps/{save,load}-TAG.safetensors and .json.

Run as a script under torchrun, or as one plain process. It only observes: the trainer's own
save and load run unchanged, and the gathering uses DeepSpeed's public accessors.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
from safetensors.torch import save_file

from gama_ds.cli import main
from gama_ds.train import checkpoint

MOMENTS = ("exp_avg", "exp_avg_sq")


def dump(engine, ckpt_dir: str, kind: str, tag: str) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero12 = engine.optimizer
    if hasattr(zero12, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19.8's ZeRO-1/2 links each parameter to its Adam state after the first
        # group's first step, when the other groups have no state yet, and never again: with
        # several parameter groups, safe_get_full_optimizer_state then fails for all but the
        # first. Linking once more, now that every group has its state, changes no tensor.
        zero12._hp_optimizer_states_linked = False
        zero12._lazy_init_hp_params_optimizer_state()
    tensors = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:  # every rank joins each gather, in the same order
            tensors[f"fp32/{name}"] = safe_get_full_fp32_param(p).detach().cpu().clone()
            for key in MOMENTS:
                tensors[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    # The AdamW the trainer built: its state is per fp32 partition (ZeRO-3 hands it those only
    # for the duration of a step, so read the state, not the groups).
    steps = [float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s]
    if dist.get_rank() == 0:
        folder = os.path.join(os.path.dirname(ckpt_dir), "dumps")
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, f"{kind}-{tag}.safetensors"))
        meta = {
            "world_size": dist.get_world_size(),
            "optimizer_steps": sorted(set(steps)),
            "lr": [g["lr"] for g in engine.optimizer.param_groups],
            "global_steps": engine.global_steps,
        }
        with open(os.path.join(folder, f"{kind}-{tag}.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
    dist.barrier()


_save, _load = checkpoint.save, checkpoint.load


def save(engine, ckpt_dir, step, client_state, keep):
    tag = _save(engine, ckpt_dir, step, client_state, keep)
    dump(engine, ckpt_dir, "save", tag)
    return tag


def load(engine, ckpt_dir, tag):
    state = _load(engine, ckpt_dir, tag)
    dump(engine, ckpt_dir, "load", tag)
    return state


if __name__ == "__main__":  # DataLoader workers started by spawn import this file again
    checkpoint.save, checkpoint.load = save, load
    raise SystemExit(main(["train", *sys.argv[1:]]))
