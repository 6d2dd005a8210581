"""What a resume on another world size costs: DeepSpeed's `ds_to_universal` conversion of a ZeRO-2
checkpoint written by 2 ranks, against DeepSpeed's own save of that checkpoint (the baseline,
measured in the same run), and the universal load on those ranks.

The model is a stand-in with the trainer's shape of checkpoint: a frozen block (excluded from the
save, like the LLM) and a trainable set of many tensors (like LoRA and the audio modules), trained
one step with a torch AdamW passed in as client optimizer, as on CPU.

    torchrun --nproc_per_node 2 bench/reshard.py [--trainable-m 50] [--tensors 400] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist


class StandIn(torch.nn.Module):
    def __init__(self, trainable: int, tensors: int, frozen: int):
        super().__init__()
        width = max(1, trainable // tensors)
        self.trainable = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(width) * 0.02) for _ in range(tensors)
        )
        self.frozen = torch.nn.Parameter(torch.randn(frozen), requires_grad=False)

    def forward(self, x):
        return sum((p * x[: p.numel()].sum()).sum() for p in self.trainable) + self.frozen.sum() * 0


def engine_for(model, universal: bool):
    import deepspeed

    config = {
        "train_batch_size": dist.get_world_size(),
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    if universal:
        config["checkpoint"] = {"load_universal": True}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=torch.optim.AdamW(params, lr=1e-3), config=config
    )
    return engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainable-m", type=float, default=50.0, help="trainable parameters, millions")
    ap.add_argument("--tensors", type=int, default=400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import deepspeed

    from gama_ds.train.checkpoint import UNIVERSAL, _to_universal

    deepspeed.init_distributed()
    rank = dist.get_rank()
    out = [args.out or (tempfile.mkdtemp(prefix="reshard_") if rank == 0 else None)]
    dist.broadcast_object_list(out, src=0)
    out = out[0]
    torch.manual_seed(0)
    n = int(args.trainable_m * 1e6)
    engine = engine_for(StandIn(n, args.tensors, frozen=n), universal=False)
    loss = engine(torch.ones(n // args.tensors + 1))
    engine.backward(loss)
    engine.step()

    dist.barrier()
    t0 = time.perf_counter()
    engine.save_checkpoint(out, tag="t", exclude_frozen_parameters=True)
    dist.barrier()
    save_s = time.perf_counter() - t0

    convert_s = 0.0
    if rank == 0:
        t0 = time.perf_counter()
        _to_universal(os.path.join(out, "t"))
        convert_s = time.perf_counter() - t0
    dist.barrier()

    torch.manual_seed(1)
    fresh = engine_for(StandIn(n, args.tensors, frozen=n), universal=True)
    dist.barrier()
    t0 = time.perf_counter()
    fresh.load_checkpoint(os.path.join(out, "t"), tag=UNIVERSAL)
    dist.barrier()
    load_s = time.perf_counter() - t0

    if rank == 0:
        size = sum(
            os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(out, "t")) for f in fs
        )
        print(
            json.dumps(
                {
                    "ranks": dist.get_world_size(),
                    "trainable_params": n,
                    "tensors": args.tensors,
                    "deepspeed_save_s": round(save_s, 2),
                    "convert_s": round(convert_s, 2),
                    "universal_load_s": round(load_s, 2),
                    "convert_over_save": round(convert_s / save_s, 2),
                    "checkpoint_with_universal_gb": round(size / 1e9, 2),
                }
            )
        )
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
