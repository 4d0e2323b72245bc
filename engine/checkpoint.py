"""Checkpoints: DeepSpeed's model/optimizer/scheduler state plus the trainer's own state, written so
that a crash at any moment leaves the previous checkpoint loadable.

Layout under `<output_dir>/checkpoints/`:

    latest                     the tag of the newest complete checkpoint (replaced atomically)
    step_00001000/             DeepSpeed files (client state: step, config)
        trainer_rank{r}.pt     per rank: RNG states (python, numpy, torch, cuda), data position,
                               latent-noise generator, counters
        ema_fp32.pt            {"ema": fp32 EMA state_dict in the REPA layout, "steps", "config"}
        config.yaml
    .tmp-step_00002000/        a checkpoint being written; renamed to step_... once every rank is done

The directory is expected to be shared by all ranks (as DeepSpeed's own checkpoints are).

Every file is read with `torch.load(weights_only=True)`: tensors, numbers, strings and containers
only, so a file that would run code when unpickled is refused naming it (`UnsafeCheckpointError`).
DeepSpeed's own files go through the same load (DeepSpeed's checkpoint engine is wrapped while it
loads), with the few plain DeepSpeed classes its ZeRO optimizer state holds allowed by name
(`DEEPSPEED_SAFE_GLOBALS`). Even so, load checkpoints only from a source you trust.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d+)$")
EMA_FILE = "ema_fp32.pt"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that holds more than tensors and plain containers (it could run code)."""


def _deepspeed_safe_globals() -> list:
    """The classes DeepSpeed pickles into its ZeRO optimizer files: plain records without side effects
    when rebuilt (attributes restored, nothing called)."""
    found = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return found


def safe_load(path: str, what: str = "checkpoint file", extra_globals: list = (), map_location="cpu") -> Any:
    """`torch.load(path, weights_only=True)`; a file that needs anything else is refused."""
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise UnsafeCheckpointError(f"{path}: refused to load this {what}: it holds more than tensors and plain "
                                    f"containers, so unpickling it could run code ({reason}); load checkpoints "
                                    "only from a source you trust") from None


class _WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with its `load` made `weights_only`."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return safe_load(path, "DeepSpeed checkpoint file", _deepspeed_safe_globals(), map_location or "cpu")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_torch_save(obj: Any, path: str) -> None:
    partial = path + ".partial"
    with open(partial, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _atomic_write_text(path: str, text: str) -> None:
    partial = path + ".partial"
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}  # loadable with weights_only
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------

def list_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of the complete checkpoints, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = TAG_RE.match(name)
        if match and os.path.isdir(os.path.join(checkpoint_dir, name)):
            found.append((int(match.group(1)), name))
    return sorted(found)


def latest_tag(checkpoint_dir: str) -> str | None:
    path = os.path.join(checkpoint_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise FileNotFoundError(f"{path} names {tag!r}, which is not a directory in {checkpoint_dir}")
    return tag


def resolve_resume(resume: str, checkpoint_dir: str) -> tuple[str, str] | None:
    """(checkpoint_dir, tag) to resume from, or None to start fresh.

    resume: "auto" (the latest checkpoint in checkpoint_dir if any), "none", a checkpoint directory
    holding `latest`, or one tag directory (.../step_00001000)."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(checkpoint_dir)
        return None if tag is None else (checkpoint_dir, tag)
    path = os.path.abspath(resume)
    if os.path.exists(os.path.join(path, LATEST)):
        return path, latest_tag(path)
    if os.path.isdir(path) and TAG_RE.match(os.path.basename(path)):
        return os.path.dirname(path), os.path.basename(path)
    raise FileNotFoundError(f"checkpoint.resume={resume!r}: neither a checkpoint directory with a "
                            f"'{LATEST}' file nor a step_* directory")


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------

def save_checkpoint(engine, checkpoint_dir: str, step: int, config: dict, rank_state: dict,
                    ema_state: dict | None, keep_last: int) -> str:
    """Write a checkpoint for `step` (collective: every rank calls it). Returns the tag directory."""
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    tmp_dir = os.path.join(checkpoint_dir, tmp_tag)
    final_dir = os.path.join(checkpoint_dir, tag)
    rank = _rank()
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)  # left by an earlier crash
    _barrier()

    engine.save_checkpoint(checkpoint_dir, tag=tmp_tag, client_state={"step": step, "config": config},
                           save_latest=False)
    rank_state = dict(rank_state, world_size=_world(), rank=rank)
    _atomic_torch_save(rank_state, os.path.join(tmp_dir, f"trainer_rank{rank}.pt"))
    if rank == 0:
        if ema_state is not None:
            _atomic_torch_save({"ema": ema_state, "steps": step, "config": config}, os.path.join(tmp_dir, EMA_FILE))
        _atomic_write_text(os.path.join(tmp_dir, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
    _barrier()

    if rank == 0:
        if os.path.exists(final_dir):  # the same step saved again: move the old one out of the way first
            stale = os.path.join(checkpoint_dir, f".old-{tag}")
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final_dir, stale)
            os.rename(tmp_dir, final_dir)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(tmp_dir, final_dir)
        _atomic_write_text(os.path.join(checkpoint_dir, LATEST), tag)
        prune(checkpoint_dir, keep_last)
    _barrier()
    return final_dir


def prune(checkpoint_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never the one `latest` names)."""
    keep = latest_tag(checkpoint_dir)
    for _, tag in list_checkpoints(checkpoint_dir)[:-keep_last]:
        if tag != keep:
            shutil.rmtree(os.path.join(checkpoint_dir, tag), ignore_errors=True)


def load_checkpoint(engine, checkpoint_dir: str, tag: str, precision: str | None = None
                    ) -> tuple[int, dict, dict | None]:
    """Load DeepSpeed's state into `engine`; return (step, this rank's trainer state, full EMA state).
    The trainer's own state is checked first (world size, and the precision it was written with, which
    decides DeepSpeed's optimizer files), so a mismatch is named instead of failing inside DeepSpeed."""
    tag_dir = os.path.join(checkpoint_dir, tag)
    rank_file = os.path.join(tag_dir, f"trainer_rank{_rank()}.pt")
    if not os.path.exists(rank_file):
        raise FileNotFoundError(f"{rank_file} is missing: the checkpoint was written by fewer ranks than "
                                f"the {_world()} running now; resume with the same world size")
    rank_state = safe_load(rank_file, "trainer state")
    if rank_state.get("world_size") != _world():
        written, per_node = rank_state.get("world_size"), rank_state.get("local_world_size")
        layout = f" ({written // per_node} node(s) x {per_node} rank(s))" if per_node and written % per_node == 0 else ""
        raise ValueError(f"checkpoint {tag_dir} was written with world size {written}{layout}, this run has "
                         f"{_world()}: exact resume needs the same world size, {written} ranks in all")
    written = rank_state.get("precision")
    if precision is not None and written is not None and written != precision:
        raise ValueError(f"train.precision resolves to {precision!r} but checkpoint {tag_dir} was written with "
                         f"{written!r} (its optimizer state is DeepSpeed's for that mode); allowed: {written!r}")
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(inner)
    try:
        path, client_state = engine.load_checkpoint(checkpoint_dir, tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    finally:
        engine.checkpoint_engine = inner
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {checkpoint_dir}")
    ema_path = os.path.join(tag_dir, EMA_FILE)
    ema = safe_load(ema_path, "EMA export")["ema"] if os.path.exists(ema_path) else None
    return int(client_state["step"]), rank_state, ema


def ema_export_path(path: str) -> str:
    """The `ema_fp32.pt` file that `path` names: the file itself, a step_* directory's, or a checkpoint
    directory's latest."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, LATEST)):
            path = os.path.join(path, latest_tag(path))
        path = os.path.join(path, EMA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no EMA export at {path}")
    return path


def load_ema_export(path: str) -> tuple[dict, dict]:
    """(fp32 EMA state_dict, config dict) from an `ema_fp32.pt`, a step_* directory or a checkpoint
    directory (its latest)."""
    path = ema_export_path(path)
    payload = safe_load(path, "EMA export")
    return payload["ema"], payload.get("config") or {}
