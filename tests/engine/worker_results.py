"""How the distributed test workers (run by trainer_fixtures.launch) hand their result to the test."""
from __future__ import annotations

import json

import torch.distributed as dist


def write_on_rank0(path: str, result) -> None:
    """Rank 0 writes `result` to `path` as JSON, then every rank meets at a barrier, so that no rank
    exits before the file is written."""
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(result, f)
    dist.barrier()
