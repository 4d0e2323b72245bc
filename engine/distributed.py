"""What a process knows about its place in a run, shared by the trainer and the sampler."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False        # the caller created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def share_cpu_cores(world_size: int) -> None:
    """CPU ranks on one machine split its cores (unless OMP_NUM_THREADS says otherwise)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
