"""Two gloo ranks joined by engine.distributed.init_distributed with a short collective timeout:
rank 1 stops taking part (it sleeps); rank 0's all-reduce on the world group and on a group made
afterwards (as DeepSpeed makes its own) must fail within the timeout. Rank 0 prints one JSON line."""
import json
import sys
import time

import torch
import torch.distributed as dist

from engine.distributed import init_distributed, is_collective_failure, set_collective_timeout

TIMEOUT_S = float(sys.argv[1])
info = init_distributed("cpu", timeout_s=TIMEOUT_S)
later = dist.new_group(ranks=[0, 1])            # torch's default timeout (30 min) until set below
set_collective_timeout(TIMEOUT_S)
dist.barrier()
if info.rank == 1:
    time.sleep(4 * TIMEOUT_S + 10)              # a hung peer: alive, connected, silent
    raise SystemExit(0)
out = {}
for name, group in (("world", None), ("later", later)):
    start = time.time()
    try:
        dist.all_reduce(torch.ones(1), group=group)
        out[name] = {"error": None}
    except Exception as error:  # noqa: BLE001 - reported to the test
        out[name] = {"seconds": time.time() - start, "type": type(error).__name__,
                     "collective_failure": is_collective_failure(error), "message": str(error)[:300]}
print(json.dumps(out), flush=True)
import os
os._exit(0)                                     # the group is broken: do not wait on it at exit
