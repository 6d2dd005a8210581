"""The process group and what every rank shares through it: devices, seeds, means, stop votes.

Everything here works the same under `deepspeed`, `torchrun` and as one plain process, which is a
world of one.
"""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UsageError


def dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as the launchers set them; one process when unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def start_process_group(local_rank: int, timeout_s: float) -> None:
    """The process group, whose collectives give up after `timeout_s` (train.collective_timeout_s):
    the last line of defence behind the watchdog, which ends a broken job long before."""
    import deepspeed

    # One plain process (no launcher) is a world of one.
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ):
        os.environ.setdefault(key, value)
    device = rank_device(local_rank)
    if device is not None:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))


def rank_device(local_rank: int) -> int | None:
    """This rank's CUDA device among those it sees, or None on CPU.

    Slurm binds GPUs by CUDA_VISIBLE_DEVICES: every task of a node sees the node's GPUs
    (--gpus-per-node), or each task sees its own (--gpus-per-task=1, --gpu-bind=single:1), and
    device 0 is then its GPU. A launch that counted GPUs sets GAMA_DS_REQUIRE_GPU=1, so that a
    node without a usable GPU ends the job with the reason instead of training on CPU in fp32."""
    where = f"rank {os.environ.get('RANK', '0')} (local rank {local_rank}) on {socket.gethostname()}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        if os.environ.get("GAMA_DS_REQUIRE_GPU") == "1":
            raise UsageError(
                f"{where}: the launch counted GPUs (GAMA_DS_REQUIRE_GPU=1) but torch sees none "
                f"(CUDA_VISIBLE_DEVICES={visible!r}, torch {torch.__version__} built for CUDA "
                f"{torch.version.cuda}); check the node's driver and the job's GPU request"
            )
        return None
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank < count:
        return local_rank
    raise UsageError(
        f"{where}: sees {count} GPUs (CUDA_VISIBLE_DEVICES={visible!r}), fewer than its local rank; "
        "start one rank per GPU"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sum_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values: list[float], device) -> list[float]:
    # On the engine's device: NCCL, the GPU backend, reduces CUDA tensors only.
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


class StopVote:
    """Whether any rank asked to stop, agreed by every rank at the same step, every step: a
    SIGTERM leaves about 30 s, which a vote at logging steps only would miss on a slow model.

    Each step sums the ranks' flags and reads the sum of the step before, which finished long
    ago, so the GPU queue never drains for it: the sum goes to pinned host memory behind an
    event, and waiting on that event waits for the previous step's work only. A stop is thus
    agreed one step after the signal."""

    def __init__(self, device):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.float32, pin_memory=cuda)
        self.done = None
        self.pending = False

    def step(self, requested: bool) -> bool:
        agreed = self._previous()
        total = torch.full((1,), 1.0 if requested else 0.0, device=self.device)  # no host sync
        if dist.is_initialized():
            dist.all_reduce(total)
        self.host.copy_(total, non_blocking=True)
        if total.is_cuda:
            self.done = torch.cuda.Event()
            self.done.record()
        self.pending = True
        return agreed

    def _previous(self) -> bool:
        if not self.pending:
            return False
        if self.done is not None:
            self.done.synchronize()
        return self.host.item() > 0
