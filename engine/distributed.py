"""Process setup, one function for the trainer, the sampler, preprocessing and evaluation.

A process learns its place in a run from its launcher's environment:

- `deepspeed` and `torchrun` (one node or many): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (the
  deepspeed launcher says LOCAL_SIZE), MASTER_ADDR, MASTER_PORT;
- SLURM (`srun python -m engine.train ...`, one task per GPU): SLURM_PROCID, SLURM_NTASKS,
  SLURM_LOCALID, SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE, and node 0 of SLURM_JOB_NODELIST as the
  master (MASTER_PORT from the environment, or derived from SLURM_JOB_ID); used only where the
  launcher variables are absent (`srun torchrun ...` keeps torchrun's);
- none of them: one process.

The local rank, never the global one, picks the GPU (cuda:LOCAL_RANK). Collectives time out after
`timeout_s` on every process group, so a lost peer ends the run with an error instead of a hang.
DeepSpeed's CPU accelerator leaves a 69 MB shared-memory buffer per rank in /dev/shm; the trainer
unlinks its own once every rank has mapped it (`release_shm_buffer`, see that section).
`run_on_main` (work done once, on rank 0, its result or error on every rank) and `gather_sorted` (a
list from every rank) are the two collectives the commands share.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False        # init_distributed created the process group (the caller destroys it)
    local_world_size: int = 1       # ranks on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------------------------
# The launcher's environment
# ----------------------------------------------------------------------------------------------

def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compressed host list, as `scontrol show hostnames` expands it:
    "gpu[01-03,07],login1" -> ["gpu01", "gpu02", "gpu03", "gpu07", "login1"] (zero padding kept)."""
    hosts, depth, start = [], 0, 0
    parts = []
    for i, char in enumerate(spec + ","):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    for part in filter(None, (p.strip() for p in parts)):
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", part)
        if match is None:
            if "[" in part or "]" in part:
                raise ValueError(f"SLURM host list {spec!r}: cannot read {part!r}")
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            if not low.isdigit() or (high and not high.isdigit()):
                raise ValueError(f"SLURM host list {spec!r}: cannot read the range {item!r}")
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{number:0{len(low)}d}{suffix}")
    return hosts


def _tasks_on_node(spec: str, node: int) -> int:
    """SLURM_TASKS_PER_NODE ("4(x2),3") -> the task count of node `node`."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r}: cannot read {item!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[min(node, len(counts) - 1)]


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) of a SLURM task, from SLURM's own; {} outside a SLURM step or where a launcher
    (torchrun, deepspeed) already set RANK."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    needed = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    missing = [key for key in needed if key not in environ]
    if missing:
        raise ValueError(f"SLURM_PROCID is set but {', '.join(missing)} not: start the ranks with srun "
                         "(one task per GPU) or with torchrun / deepspeed")
    out = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
           "LOCAL_RANK": environ["SLURM_LOCALID"]}
    node = int(environ.get("SLURM_NODEID", "0"))
    if "SLURM_NTASKS_PER_NODE" in environ:
        out["LOCAL_WORLD_SIZE"] = str(_tasks_on_node(environ["SLURM_NTASKS_PER_NODE"], node))
    elif "SLURM_TASKS_PER_NODE" in environ:
        out["LOCAL_WORLD_SIZE"] = str(_tasks_on_node(environ["SLURM_TASKS_PER_NODE"], node))
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST"))
        if not nodelist:
            raise ValueError("a SLURM task without MASTER_ADDR or SLURM_JOB_NODELIST: set MASTER_ADDR to node 0's "
                             "address (e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1))")
        out["MASTER_ADDR"] = expand_hostlist(nodelist)[0]
    if "MASTER_PORT" not in environ:
        # every task of a job derives the same port; jobs sharing a node get different ones
        out["MASTER_PORT"] = str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def world_size_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """WORLD_SIZE as the launcher gives it (SLURM_NTASKS under srun), before any process group exists."""
    return _env_int(environ, "WORLD_SIZE", _env_int(slurm_environment(environ), "WORLD_SIZE", 1))


def _env_int(environ: Mapping[str, str], key: str, default: int) -> int:
    value = environ.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} in the environment is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Devices and threads
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------

def set_collective_timeout(timeout_s: float) -> int:
    """Give every process group that exists now (the world group and those DeepSpeed made from it)
    the timeout `timeout_s`; returns how many. Groups created later take torch's default (30 min,
    NCCL 10 min), so call this after `deepspeed.initialize`."""
    timeout = timedelta(seconds=timeout_s)
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # torch < 2.12
    groups = list(dist.distributed_c10d._world.pg_map)
    for group in groups:
        setter(timeout, group)
    return len(groups)


class PeerLostError(RuntimeError):
    """A collective failed or timed out: another rank died, hung or lost its network."""


# What gloo and NCCL say when a peer is gone (torch < 2.3 raises them as plain RuntimeErrors)
_PEER_FAILURE_MARKERS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer", "timed out",
                         "broken pipe", "connection refused", "socket")


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a communication failure (a lost or stalled peer), not a bug of this rank."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _PEER_FAILURE_MARKERS)


def init_distributed(device: str = "cpu", *, local_rank: Optional[int] = None, timeout_s: Optional[float] = None,
                     require_group: bool = False) -> DistInfo:
    """This process's rank, world and device, and the process group it joins.

    `device`: "cuda" (each rank takes cuda:LOCAL_RANK), "cuda:N" (one process only) or "cpu" (gloo,
    and DeepSpeed's CPU accelerator for a later `import deepspeed`). `local_rank`: the deepspeed
    launcher's `--local_rank` argument (the environment's LOCAL_RANK wins). A group is created where
    WORLD_SIZE > 1, or for one process too with `require_group` (DeepSpeed needs one), unless the
    caller made it already; `timeout_s` bounds every collective on it (torch's default otherwise)."""
    environ = os.environ
    environ.update(slurm_environment(environ))
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local_rank = _env_int(environ, "LOCAL_RANK", local_rank if local_rank is not None else 0)
    local_world = _env_int(environ, "LOCAL_WORLD_SIZE", _env_int(environ, "LOCAL_SIZE", world))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world} in the environment; need 0 <= RANK < WORLD_SIZE")
    if not 0 <= local_rank < max(local_world, 1) or local_rank > rank:
        raise ValueError(f"LOCAL_RANK={local_rank} with RANK={rank} and LOCAL_WORLD_SIZE={local_world} in the "
                         "environment; need 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE and LOCAL_RANK <= RANK")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"collective timeout {timeout_s!r} s; need a positive number of seconds")

    try:
        target = torch.device(device)
    except RuntimeError:
        target = None
    if target is None or target.type not in ("cuda", "cpu"):
        raise ValueError(f"device {device!r}; allowed: 'cuda', 'cuda:N' or 'cpu'")
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here; use cpu")
        if target.index is not None and world > 1:
            raise ValueError(f"device {device!r} with WORLD_SIZE={world} would put every rank on one GPU; "
                             "use 'cuda' (each rank takes cuda:LOCAL_RANK)")
        # the device before the process group: more ranks than GPUs is then a clear error, not a hang
        target = local_cuda_device(local_rank if target.index is None else target.index)
    else:
        environ["DS_ACCELERATOR"] = "cpu"  # read by deepspeed when it is first imported
        share_cpu_cores(world)

    owns_group = False
    if (world > 1 or require_group) and not dist.is_initialized():
        if world == 1:
            environ.setdefault("MASTER_ADDR", "127.0.0.1")
            environ.setdefault("MASTER_PORT", str(_free_port()))
        # DeepSpeed reads LOCAL_RANK from the environment; torch's env:// the others
        environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                       LOCAL_WORLD_SIZE=str(local_world))
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start the ranks with deepspeed, "
                             "torchrun or srun, or set them by hand")
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
        owns_group = True
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(f"RANK={rank}, WORLD_SIZE={world} in the environment but the process group has rank "
                               f"{dist.get_rank()} of {dist.get_world_size()}")
        if timeout_s is not None and not owns_group:
            set_collective_timeout(timeout_s)
    return DistInfo(rank, local_rank, world, target, owns_group, local_world)


@contextlib.contextmanager
def command_process(device: str, *, local_rank: Optional[int] = None, timeout_s: Optional[float] = None,
                    worker_log_level: int = logging.WARNING) -> Iterator[DistInfo]:
    """A command-line entry point's process (engine.sample, engine.evaluate, engine.preprocess): joins
    the run as `init_distributed` does, logs to stderr tagged with its rank (rank 0 at INFO, the others
    at `worker_log_level`; left alone where logging is configured already) and, on the way out, error
    or not, destroys the process group where it created it."""
    info = init_distributed(device, local_rank=local_rank, timeout_s=timeout_s)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if info.is_main else worker_log_level, stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s [rank {info.rank}] %(name)s: %(message)s")
    try:
        yield info
    finally:
        if info.owns_group:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# DeepSpeed's shared-memory all-reduce buffers (CPU accelerator)
# ----------------------------------------------------------------------------------------------
# DeepSpeed's CPU accelerator (0.19.8) gives each rank of a one-machine run (LOCAL_SIZE == world size,
# which the deepspeed launcher sets) a 69 MB POSIX shared-memory buffer for its shm all-reduce, made
# when deepspeed.initialize / deepspeed.init_distributed builds its backend (comm/torch.py,
# TorchBackend.__init__) and named by ops/csrc/cpu/comm/shm.cpp, shm_initialize:
# /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>. DeepSpeed never
# unlinks it (shared_close is never called), so every run, finished or killed, left its buffers in
# /dev/shm, which is RAM: 140 of them (9 GB) made later runs on a 24 GB machine crash. The trainer
# unlinks its rank's buffer once every rank has mapped every other's (`release_shm_buffer`); the
# mappings stay valid until the processes exit, so the all-reduce is unchanged (our training does not
# even use it: only DeepSpeed's inference_all_reduce does).

SHM_DIR = "/dev/shm"
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int, master_addr: str, master_port, uid: Optional[int] = None) -> str:
    """The path of rank `rank`'s DeepSpeed shm all-reduce buffer in the run whose rendezvous is
    `master_addr`:`master_port`, of the user `uid` (this process's by default)."""
    uid = os.getuid() if uid is None else uid
    return os.path.join(SHM_DIR, f"{SHM_BUFFER_PREFIX}_{uid}_{master_addr}_{master_port}_{rank}")


def release_shm_buffer(info: DistInfo) -> Optional[str]:
    """Unlink this rank's DeepSpeed shm all-reduce buffer, after a barrier by which every rank has mapped
    every other's (DeepSpeed maps them all before its backend exists); returns the path removed, None
    where there was none (a GPU run, a run across machines, a launcher without LOCAL_SIZE). Call it on
    every rank after deepspeed.initialize; the buffer then goes when the processes do, even on SIGKILL."""
    if info.device.type != "cpu":
        return None
    if info.world_size > 1:
        dist.barrier()
    path = shm_buffer_path(info.rank, os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    return path


def _mapped_by_a_live_process(path: str) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(line.rstrip("\n").endswith(" " + path) for line in f):
                    return True
        except OSError:  # gone, or another user's (whose buffers carry another uid)
            continue
    return False


def remove_shm_buffers(master_addr: str, master_port, world_size: int, wait_s: float = 10.0) -> list[str]:
    """Remove the DeepSpeed shm buffers a run that has ended left behind (ranks killed before
    `release_shm_buffer`, other commands that use DeepSpeed): only the names of that run (this user,
    `master_addr`:`master_port`, ranks 0..world_size-1), and none that a live process still maps (a
    rank still exiting: waited for up to `wait_s` s; a new run that took the port since: left alone).
    Returns the paths removed."""
    removed = []
    for rank in range(world_size):
        path = shm_buffer_path(rank, master_addr, master_port)
        deadline = time.monotonic() + wait_s
        while os.path.exists(path) and _mapped_by_a_live_process(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not os.path.exists(path) or _mapped_by_a_live_process(path):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------
# Collectives the commands share
# ----------------------------------------------------------------------------------------------

def run_on_main(info: DistInfo, fn):
    """fn() on rank 0 only (creating a directory, resolving "latest"); every rank gets its result, or
    raises its error, so that no rank waits forever for one that failed. Collective where
    `info.world_size` > 1."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - passed on to every rank, then raised
            error = exc
    if info.world_size > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def gather_sorted(info: DistInfo, values: list) -> list:
    """The `values` of every rank, concatenated and sorted; the same list on every rank (collective
    where `info.world_size` > 1)."""
    if info.world_size == 1:
        return sorted(values)
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, values)
    return sorted(v for part in gathered for v in part)
