"""One rank of the smallest run that makes DeepSpeed's CPU shm all-reduce buffer (start it with the
deepspeed launcher, which sets LOCAL_SIZE): engine.distributed's gloo group, DeepSpeed's backend over it
(as deepspeed.initialize builds it), then the trainer's release_shm_buffer unless `--keep`. Writes its
pid to <dir>/ready.<rank> and waits to be killed."""
import argparse
import os
import time

from engine.distributed import init_distributed, release_shm_buffer

parser = argparse.ArgumentParser()
parser.add_argument("dir")
parser.add_argument("--keep", action="store_true", help="leave the buffer as DeepSpeed does")
args, _ = parser.parse_known_args()  # the launcher adds --local_rank

info = init_distributed("cpu", require_group=True)
import deepspeed  # noqa: E402 - after init_distributed chose the CPU accelerator

deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
if not args.keep:
    release_shm_buffer(info)
ready = os.path.join(args.dir, f"ready.{info.rank}")
with open(ready + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(ready + ".tmp", ready)
time.sleep(600)
