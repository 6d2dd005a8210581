"""The ranks of a data-parallel evaluation: who am I, and what the others hold.

A suite runs as one plain process or as one process per GPU under any launcher that sets
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun, the deepspeed launcher, a Slurm
script that exports them). Only Python objects travel between ranks (row indices, answer
texts), so the group is gloo over TCP whatever the device: it needs no GPU collective and works
across nodes.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from ..train.distributed import dist_env


class Ranks:
    def __init__(self, timeout_s: float):
        self.world, self.rank, self.local_rank = dist_env()
        self._group = self.world > 1
        if self._group:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if not self._group:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def gather(self, value) -> list | None:
        """Every rank's `value` in rank order on rank 0; None elsewhere."""
        if not self._group:
            return [value]
        out = [None] * self.world if self.main else None
        dist.gather_object(value, out, dst=0)
        return out

    def close(self) -> None:
        if self._group and dist.is_initialized():
            dist.destroy_process_group()
