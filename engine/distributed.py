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


def local_cuda_device(local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK, made current; a clear error where the launcher started more ranks on this
    machine than it has GPUs (NCCL cannot put two ranks on one GPU)."""
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this process sees {count} GPU(s)"
                           + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                           + f": start at most {count} rank(s) per machine (deepspeed --num_gpus {count}, "
                           f"torchrun --nproc_per_node {count}), or give each rank its GPUs")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)
