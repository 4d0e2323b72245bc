"""Tiny experiment configs and launch helpers shared by the trainer tests."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
if not os.path.exists(DEEPSPEED):
    import shutil

    DEEPSPEED = shutil.which("deepspeed") or DEEPSPEED


def tiny_config(run_dir, data_root, **sections) -> dict:
    """A SiT with REPA + REG + CAR-Flow small enough for a step in well under a second on one core:
    16 x 16 pixels, patch 4 (16 tokens), width 32, depth 2; a random-weight test_vit encoder at 64 px
    (4 x 4 tokens); built-in data with 8 images per class."""
    raw = {
        "model": dict(name="SiT-S/4", input_size=16, in_channels=3, num_classes=4, class_dropout_prob=0.1,
                      hidden_size=32, depth=2, num_heads=2, encoder_depth=1, z_dims=[64], projector_dim=32,
                      reg=True, car_flow="joint", car_flow_shape="channel", car_flow_rank=8),
        "transport": dict(path="linear", proj_coeff=0.5, cls_coeff=0.03),
        "data": dict(source="builtin", root=str(data_root), resolution=16,
                     num_classes=4, batch_size=4, decoder="pil", num_workers=0, builtin_images_per_class=8,
                     builtin_image_size=16),
        "encoders": [dict(name="test_vit", pretrained=False, resolution=16, image_size=64)],
        "latent": dict(kind="identity", scale=1.0),
        "train": dict(output_dir=str(run_dir), max_steps=6, global_batch_size=8,
                      deepspeed_config="configs/deepspeed/zero2.json", precision="fp32", seed=3),
        "optim": dict(lr=1.0e-3, warmup_steps=2, grad_clip=1.0),
        "ema": dict(decay=0.9),
        "checkpoint": dict(every=0, keep_last=2),
        "logging": dict(log_every=1, progress_bar=False, tensorboard=False, sample_every=0),
        "sample": dict(num_steps=2, method="euler", num_images=0, batch_size=4, grid_images=4),
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def leave_no_process_group() -> None:
    """Destroy this process's one-rank group after in-process Trainer tests, through DeepSpeed where it
    made the group: DeepSpeed keeps references to the group (deepspeed.utils.groups), and a later
    Trainer in this process would reuse them ("Group ... is not registered") after a plain
    torch.distributed.destroy_process_group()."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and comm.cdb is not None:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()


@contextlib.contextmanager
def in_process_trainers():
    """For a test module whose Trainers join a one-rank gloo group in this process (a module-scoped
    autouse fixture wraps its tests in this): leave no group and no launcher environment behind."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        leave_no_process_group()
        os.environ.clear()
        os.environ.update(saved)


def write_config(raw: dict, path) -> str:
    path = str(path)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def write_zero3_json(path) -> str:
    """ZeRO-3 that really partitions a tiny model (the default threshold would keep it whole)."""
    with open(os.path.join(REPO, "configs/deepspeed/zero3.json")) as f:
        ds = json.load(f)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    with open(path, "w") as f:
        json.dump(ds, f)
    return str(path)


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    # a launcher sets these for its ranks; values an in-process test left behind (init_distributed
    # writes them into os.environ) must not reach them: an inherited LOCAL_WORLD_SIZE=1 broke rank 1
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    e.update(extra or {})
    return e


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A rank of a two-rank CPU run once died mid-training in C++ ("terminate called without an active
# exception", SIGABRT) in a full CI-like run on 2026-12-02, and not in 12 reruns of the same test; such a
# crash of the process, not a wrong number, is retried once (and said so), so a flake of the gloo/DeepSpeed
# runtime does not fail CI. Results are checked as before, and a crash that repeats fails.
RUNTIME_ABORT = "terminate called without an active exception"


def launch(args: list[str], nproc: int = 2, module: str = "engine.train", timeout: int = 300,
           env_extra: dict | None = None):
    """Run `module args` on `nproc` CPU ranks with the deepspeed launcher (`env_extra` added to the
    environment); returns the CompletedProcess. DeepSpeed shm buffers its ranks left (a crash before the
    trainer released them) are removed."""
    from engine.distributed import remove_shm_buffers

    for attempt in (1, 2):
        port = free_port()
        cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(port), "--module", module, *args]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env(env_extra), capture_output=True, text=True,
                                  timeout=timeout)
        finally:
            remove_shm_buffers("127.0.0.1", port, nproc)
        if proc.returncode == 0 or RUNTIME_ABORT not in proc.stderr or attempt == 2:
            break
        print(f"retrying once: a rank aborted in the C++ runtime ({RUNTIME_ABORT!r}): {' '.join(cmd)}")
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_ranks(module: str, argv: list[str], world_size: int = 2, timeout: int = 120) -> list[str]:
    """`python -m module argv` as `world_size` CPU ranks joined by the environment (as torchrun sets
    it); returns each rank's output, and fails naming the rank that did not exit 0."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        e = env(dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                     LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        procs.append(subprocess.Popen([PYTHON, "-m", module, *argv], cwd=REPO, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed ({proc.returncode}):\n{output[-6000:]}"
    return outputs
