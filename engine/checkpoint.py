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

import dataclasses
import os
import pickle
import random
import re
import shutil
import zipfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from engine.atomic_files import write_atomic

LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d+)$")
EMA_FILE = "ema_fp32.pt"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that holds more than tensors and plain containers (it could run code)."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that is truncated or unreadable (named, with the reason)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, an I/O error): raised on every rank, naming the file
    and the OS error, after the partial directory was removed; the previous checkpoint stays `latest`."""


def describe_os_error(error: BaseException) -> str:
    """'No space left on device (ENOSPC)' for an OSError, else its first line."""
    import errno as errno_names

    if isinstance(error, OSError) and error.errno:
        name = errno_names.errorcode.get(error.errno, str(error.errno))
        return f"{error.strerror or os.strerror(error.errno)} ({name})"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {first[:200]}"


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
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:  # torch's reader on a truncated file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptCheckpointError(f"{path}: this {what} is truncated or unreadable ({first[:200]})") from None
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


class _GuardedSaveCheckpointEngine:
    """DeepSpeed's checkpoint engine with its `save` made durable and fault-tolerant: each file is written
    through a Python file object (so a full disk is an OSError with its errno, not torch's "unexpected
    pos") and fsynced; a failed write is recorded in `failures` (and later files skipped) instead of
    raised, so this rank still reaches DeepSpeed's collectives and the failure is agreed on after."""

    def __init__(self, inner, failures: list):
        self._inner, self._failures = inner, failures

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def save(self, state_dict, path: str):
        if self._failures:
            return
        try:
            if hasattr(self._inner, "zipfile_serialization"):  # DeepSpeed's TorchCheckpointEngine
                with open(path, "wb") as f:
                    torch.save(state_dict, f, _use_new_zipfile_serialization=self._inner.zipfile_serialization)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                self._inner.save(state_dict, path)
        except (OSError, RuntimeError) as error:
            self._failures.append(f"{path}: {describe_os_error(error)}")


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
    write_atomic(path, lambda f: torch.save(obj, f))


def _atomic_write_text(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


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
    if not TAG_RE.match(tag) or not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise FileNotFoundError(f"{path} names {tag!r}, which is not a directory in {checkpoint_dir}")
    return tag


def resolve_resume(resume: str, checkpoint_dir: str) -> tuple[str, str] | None:
    """(checkpoint_dir, tag) to resume from, or None to start fresh (the first of `resume_candidates`)."""
    found, _ = resume_candidates(resume, checkpoint_dir)
    return found[0] if found else None


def resume_candidates(resume: str, checkpoint_dir: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The checkpoints to try, best first, as (checkpoint_dir, tag), and warnings about the directory.

    resume: "auto" (the checkpoints in checkpoint_dir, if any), "none", a checkpoint directory, or one
    tag directory (.../step_00001000, tried alone). In a checkpoint directory the one `latest` names
    comes first, then the older complete ones, newest first (the fallback where one is unreadable); a
    `latest` that is unreadable or names no directory is warned about and the newest complete
    checkpoint is used."""
    if resume == "none":
        return [], []
    if resume == "auto":
        directory = checkpoint_dir
    else:
        directory = os.path.abspath(resume)
        if os.path.isdir(directory) and TAG_RE.match(os.path.basename(directory)):
            return [(os.path.dirname(directory), os.path.basename(directory))], []
        if not os.path.isdir(directory) or not (os.path.exists(os.path.join(directory, LATEST))
                                                or list_checkpoints(directory)):
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: neither a checkpoint directory with a "
                                    f"'{LATEST}' file nor a step_* directory")
    warnings = []
    try:
        latest = latest_tag(directory)
    except (OSError, UnicodeDecodeError) as error:
        warnings.append(f"{os.path.join(directory, LATEST)} is unreadable or names no checkpoint ({error}); "
                        "using the newest complete checkpoint")
        latest = None
    tags = [tag for _, tag in reversed(list_checkpoints(directory))]
    if latest is not None:
        step = int(TAG_RE.match(latest).group(1)) if TAG_RE.match(latest) else None
        tags = [latest] + [tag for tag in tags if step is None or int(TAG_RE.match(tag).group(1)) < step]
    elif not tags:
        return [], warnings
    return [(directory, tag) for tag in tags], warnings


def check_readable(tag_dir: str) -> str | None:
    """None when the checkpoint at `tag_dir` looks whole without loading it, else what is wrong, naming
    the file: every .pt file must be a complete torch archive (a truncated one has lost the zip
    directory at its end), config.yaml must parse, and the EMA export must be there. (A file damaged
    inside an intact archive is found when it is loaded, and named then.)"""
    if not os.path.isdir(tag_dir):
        return f"{tag_dir} is not a directory"
    names = sorted(os.listdir(tag_dir))
    if EMA_FILE not in names:
        return f"{os.path.join(tag_dir, EMA_FILE)} is missing"
    for name in names:
        path = os.path.join(tag_dir, name)
        try:
            if name.endswith(".pt"):
                with zipfile.ZipFile(path) as archive:
                    size = os.path.getsize(path)
                    if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                        return f"{path} is truncated (its archive lists data beyond the end of the file)"
            elif name == "config.yaml":
                with open(path) as f:
                    yaml.safe_load(f)
        except (OSError, zipfile.BadZipFile, yaml.YAMLError, UnicodeDecodeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return f"{path} is truncated or unreadable ({first[:200]})"
    return None


def agree(problem: str | None) -> str | None:
    """Every rank's `problem` (collective): the first rank's that is not None, the same on all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problem)
    return next((p for p in gathered if p is not None), None)


# ----------------------------------------------------------------------------------------------
# Resume policy: which config keys a resume may change
# ----------------------------------------------------------------------------------------------

# (rule, why) per dotted key or section; the longest matching prefix decides ("encoders[0].name" is looked
# up as "encoders.name"). Rules:
#   refuse  the resume stops with a one-line ConfigError naming the key and the checkpoint's value
#   apply   the new value takes effect from the resumed step on (logged)
#   path    the same files at another path (logged; the data loader still checks the number of samples)
RESUME_RULES: dict[str, tuple[str, str]] = {
    "model": ("refuse", "the checkpoint's weights have this model's shapes and meaning"),
    "model.grad_checkpointing": ("apply", "activation memory only"),
    "model.fused_gelu": ("apply", "a kernel choice (the numbers may differ in rounding)"),
    "model.batched_modulation": ("apply", "a kernel choice (the numbers may differ in rounding)"),
    "model.fused_bias_grad": ("apply", "a kernel choice (the numbers may differ in rounding)"),
    "model.mlp_kernel": ("apply", "a kernel choice (the numbers may differ in rounding)"),
    "transport": ("apply", "the loss weighting and time sampling of the steps from now on"),
    "transport.path": ("refuse", "it defines the velocity the model has learned"),
    "transport.prediction": ("refuse", "it defines what the model has learned to predict"),
    "transport.reversed_time": ("refuse", "it defines the time direction the model has learned"),
    "data": ("refuse", "the saved data position indexes this sample order, crop and batch"),
    "data.root": ("path", "the same data at another path"),
    "data.latents_root": ("path", "the same latent shards at another path"),
    "data.cache_dir": ("path", "an index cache"),
    "data.decoder": ("apply", "decoding speed; DALI's and PIL's pixels differ slightly"),
    "data.dali_device": ("apply", "decoding speed"),
    "data.num_threads": ("apply", "decoding speed"),
    "data.prefetch": ("apply", "decoding speed"),
    "data.num_workers": ("apply", "loading speed (the batches do not depend on it)"),
    "data.on_corrupt": ("apply", "what a corrupt file does from now on"),
    "data.validate": ("apply", "the file check of the index"),
    "encoders": ("refuse", "the alignment targets the projectors have learned"),
    "encoders.weights_path": ("path", "the same encoder weights at another path"),
    "encoders.autocast_dtype": ("apply", "the encoder's precision on CUDA"),
    "encoders.fused": ("apply", "the encoder's kernels on CUDA"),
    "latent": ("refuse", "the latent space the model has learned"),
    "latent.path": ("path", "the same latent space at another path"),
    "latent.dtype": ("apply", "the VAE's compute precision"),
    "train": ("apply", "settings of the run from now on"),
    "train.output_dir": ("path", "where the run writes from now on"),
    "train.deepspeed_config": ("path", "its ZeRO stage is checked as train.zero_stage"),
    "train.zero_stage": ("resolved", "checked as the stage it resolves to"),
    "train.precision": ("resolved", "checked as the precision it resolves to"),
    "train.global_batch_size": ("refuse", "the data position and the optimizer's steps count global batches"),
    "train.grad_accum_steps": ("resolved", "checked as the accumulation it resolves to"),
    "train.seed": ("refuse", "the checkpoint holds the RNG streams; a new seed would be ignored"),
    "train.max_steps": ("apply", "where the run ends (at least the checkpoint's step)"),
    "optim": ("apply", "written into the optimizer and the lr schedule after loading"),
    "optim.step_kernel": ("apply", "a kernel choice: both keep torch AdamW's state (the numbers may differ in "
                                   "rounding)"),
    "ema": ("apply", "the EMA decay from the resumed step on"),
    "checkpoint": ("apply", "checkpointing from now on (init_weights is not used by a resume)"),
    "logging": ("apply", "logging from now on"),
    "sample": ("apply", "sampling from now on"),
    "eval": ("apply", "evaluation from now on"),
    "eval.num_images": ("eval", "the evaluation curve continues"),
}
for _key in ("ref", "random_inception", "encoder_metrics", "real_images", "num_steps", "method", "cfg_scale",
             "batch_size", "seed"):
    RESUME_RULES[f"eval.{_key}"] = ("eval", "the evaluation curve continues")
del _key


def resume_rule(key: str) -> tuple[str, str]:
    """(rule, why) of a dotted config key under RESUME_RULES (refuse where no entry matches)."""
    plain = re.sub(r"\[\d+\]", "", key)
    while plain:
        if plain in RESUME_RULES:
            return RESUME_RULES[plain]
        plain = plain.rpartition(".")[0]
    return "refuse", "a key the resume policy does not know"


def config_leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a config dataclass down to its fields (a list of sections, as encoders, by
    index and its length; free-form mappings such as model_kwargs and other lists whole)."""
    if dataclasses.is_dataclass(config):
        out = {}
        for f in dataclasses.fields(config):
            out.update(config_leaves(getattr(config, f.name), f"{prefix}.{f.name}" if prefix else f.name))
        return out
    if isinstance(config, list) and config and all(dataclasses.is_dataclass(item) for item in config):
        out = {prefix: len(config)}
        for i, item in enumerate(config):
            out.update(config_leaves(item, f"{prefix}[{i}]"))
        return out
    return {prefix: config}


_MISSING = object()


def _lookup(raw: Any, key: str) -> Any:
    """The value at dotted `key` of a plain config dict (a list of sections counts as its length)."""
    node = raw
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if part.startswith("["):
            index = int(part[1:-1])
            if not isinstance(node, list) or index >= len(node):
                return _MISSING
            node = node[index]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    if isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
        return len(node)
    return node


def resume_changes(saved: dict, now, where: str) -> list[tuple[str, Any, Any, str]]:
    """Compare the config a checkpoint was written with (`saved`, a dict) with this run's (`now`, an
    ExperimentConfig), key by key under
    RESUME_RULES. A key that may not change raises ConfigError(key, new value, the checkpoint's value and
    why); returns (key, old, new, rule) of the keys that change and are applied or moved ("resolved" and
    "eval" keys are left to the caller, which checks what they resolve to)."""
    from engine.configurable import ConfigError

    changes = []
    for key, value in config_leaves(now).items():
        before = _lookup(saved, key)
        if before is _MISSING or before == value:
            continue  # a key the checkpoint's version did not have keeps its default
        rule, why = resume_rule(key)
        if rule == "refuse":
            raise ConfigError(key, value, f"{before!r}, the value checkpoint {where} was written with (a resume "
                              f"cannot change it: {why}); or start a new run (another train.output_dir, or "
                              "checkpoint.resume=none)")
        changes.append((key, before, value, rule))
    return changes


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------

def save_checkpoint(engine, checkpoint_dir: str, step: int, config: dict, rank_state: dict,
                    ema_state: dict | None, keep_last: int) -> str:
    """Write a checkpoint for `step` (collective: every rank calls it). Returns the tag directory.

    Everything is written into `.tmp-<tag>/`, renamed to `<tag>/` once every rank has written, then
    `latest` is replaced. A write that fails on any rank (disk full, an I/O error) is agreed on by all
    ranks: the partial directory is removed and every rank raises the same CheckpointWriteError naming
    the file and the OS error, so no rank waits for another and the previous checkpoint stays `latest`."""
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    tmp_dir = os.path.join(checkpoint_dir, tmp_tag)
    final_dir = os.path.join(checkpoint_dir, tag)
    rank = _rank()
    failures: list[str] = []

    def attempt(path: str, write) -> None:
        if failures:
            return
        try:
            write()
        except OSError as error:
            failures.append(f"{path}: {describe_os_error(error)}")

    def stop_if_failed(stage: str) -> None:
        failure = agree(f"rank {rank}: {failures[0]}" if failures else None)
        if failure is None:
            return
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        _barrier()
        try:
            previous = latest_tag(checkpoint_dir)
        except (OSError, UnicodeDecodeError):
            previous = None
        raise CheckpointWriteError(f"checkpoint {final_dir} not written ({stage}): {failure}; the partial directory "
                                   f"{tmp_dir} was removed and {previous or 'no checkpoint'} stays latest")

    if rank == 0:
        def prepare():
            os.makedirs(checkpoint_dir, exist_ok=True)
            if os.path.exists(tmp_dir):
                shutil.rmtree(tmp_dir)  # left by an earlier crash
        attempt(tmp_dir, prepare)
    stop_if_failed("preparing")

    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _GuardedSaveCheckpointEngine(inner, failures)
    real_copy = getattr(engine, "_copy_recovery_script", None)
    if real_copy is not None:  # rank 0 copies DeepSpeed's zero_to_fp32.py into the directory
        def copy_recovery_script(save_path):
            attempt(save_path, lambda: real_copy(save_path))
        object.__setattr__(engine, "_copy_recovery_script", copy_recovery_script)
    try:
        engine.save_checkpoint(checkpoint_dir, tag=tmp_tag, client_state={"step": step, "config": config},
                               save_latest=False)
    finally:
        engine.checkpoint_engine = inner
        if real_copy is not None:
            object.__delattr__(engine, "_copy_recovery_script")
    rank_state = dict(rank_state, world_size=_world(), rank=rank)
    rank_file = os.path.join(tmp_dir, f"trainer_rank{rank}.pt")
    attempt(rank_file, lambda: _atomic_torch_save(rank_state, rank_file))
    if rank == 0:
        if ema_state is not None:
            ema_file = os.path.join(tmp_dir, EMA_FILE)
            attempt(ema_file, lambda: _atomic_torch_save({"ema": ema_state, "steps": step, "config": config}, ema_file))
        config_file = os.path.join(tmp_dir, "config.yaml")
        attempt(config_file, lambda: _atomic_write_text(config_file, yaml.safe_dump(config, sort_keys=False)))
    stop_if_failed("writing")

    if rank == 0:
        def publish():
            if os.path.exists(final_dir):  # the same step saved again: move the old one out of the way first
                stale = os.path.join(checkpoint_dir, f".old-{tag}")
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(final_dir, stale)
                os.rename(tmp_dir, final_dir)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp_dir, final_dir)
            try:
                _atomic_write_text(os.path.join(checkpoint_dir, LATEST), tag)
            except OSError:
                if latest_tag_or_none(checkpoint_dir) != tag:
                    os.rename(final_dir, tmp_dir)  # not published: removed with the partial directory
                raise
        attempt(os.path.join(checkpoint_dir, LATEST), publish)
        if not failures:
            prune(checkpoint_dir, keep_last)
    stop_if_failed("publishing")
    return final_dir


def latest_tag_or_none(checkpoint_dir: str) -> str | None:
    try:
        return latest_tag(checkpoint_dir)
    except (OSError, UnicodeDecodeError):
        return None


def prune(checkpoint_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never the one `latest` names)."""
    keep = latest_tag(checkpoint_dir)
    for _, tag in list_checkpoints(checkpoint_dir)[:-keep_last]:
        if tag != keep:
            shutil.rmtree(os.path.join(checkpoint_dir, tag), ignore_errors=True)


def saved_config(tag_dir: str) -> dict | None:
    """The config a checkpoint was written with (its config.yaml), or None where it has none."""
    path = os.path.join(tag_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def load_checkpoint(engine, checkpoint_dir: str, tag: str, precision: str | None = None, before_load=None
                    ) -> tuple[int, dict, dict | None]:
    """Load DeepSpeed's state into `engine`; return (step, this rank's trainer state, full EMA state).
    The trainer's own state is checked first (world size, and the precision it was written with, which
    decides DeepSpeed's optimizer files), then `before_load(rank_state, tag_dir)` where given (the
    trainer's resume policy), so a mismatch is named instead of failing inside DeepSpeed."""
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
    if before_load is not None:
        before_load(rank_state, tag_dir)
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
