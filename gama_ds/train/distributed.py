"""The process group and what every rank shares through it: ranks, seeds, means, stop requests.

Everything here works the same under `deepspeed`, `torchrun` and as one plain process, which is a
world of one.
"""

from __future__ import annotations

import os
import random
import signal
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


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
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))


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


def _start_resource_tracker_deaf_to_usr1() -> None:
    """Slurm's --signal=USR1@T reaches every process of the job step, multiprocessing's resource
    tracker too, which dies of it and leaves the DataLoader's semaphores to leak. Started with
    USR1 ignored, it keeps that disposition (an ignored signal stays ignored across exec)."""
    from multiprocessing import resource_tracker

    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGUSR1, previous)


class StopSignal:
    """SIGTERM or SIGUSR1 (preemption, Slurm's warning) asks for a checkpoint and a clean exit.

    The request is agreed on without a collective of its own: its flag travels in the all-reduce
    the loop does for logging anyway (`flag`, then `agreed`), so every rank reads the same sum at
    the same step and all save together, and a GPU is not stalled by an extra host sync per step.
    """

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def flag(self) -> float:
        """This rank's vote, to be summed over ranks with the logging metrics."""
        return 1.0 if self.received else 0.0

    @staticmethod
    def agreed(mean_flag: float) -> bool:
        """True on every rank when any rank had the signal: the votes' mean is the same everywhere."""
        return mean_flag > 0
