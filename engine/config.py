"""The experiment configuration: one typed dataclass per component, composed into `ExperimentConfig`,
loaded from YAML with dotted command-line overrides and validated before any work starts.

Each component owns its dataclass (`engine.models.ModelConfig`, `engine.transport.TransportConfig`,
`engine.data.DataConfig`, ...); this module adds the trainer's own sections and the checks that span
several sections. Every error names the key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from engine.data import DataConfig
from engine.models import ModelConfig
from engine.models.encoders import EncoderConfig
from engine.models.latents import LatentConfig
from engine.transport import TransportConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
    """A configuration problem, found before any work starts."""


# ----------------------------------------------------------------------------------------------
# The trainer's own sections
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """What to run and where. `global_batch_size` = world size x data.batch_size (the micro-batch per
    rank) x gradient accumulation; leave `grad_accum_steps` null to derive it from the other two."""

    output_dir: str = "runs/default"
    max_steps: int = 400_000                   # optimizer steps
    max_minutes: Optional[float] = None        # stop early (samples and curves are still written)
    global_batch_size: int = 256
    grad_accum_steps: Optional[int] = None
    # bf16: bf16 weights with fp32 master copies in the optimizer (DeepSpeed's bf16 mode); bf16-mixed: fp32
    # weights, the model under bf16 autocast, as REPA's code trains (but DeepSpeed reduces the Linear/Conv
    # gradients across ranks in bf16, REPA's DDP in fp32); auto: bf16 on CUDA, fp32 on CPU
    precision: Literal["auto", "bf16", "bf16-mixed", "fp32", "fp16"] = "auto"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    zero_stage: Optional[int] = None           # overrides the JSON's zero_optimization.stage
    device: Literal["auto", "cuda", "cpu"] = "auto"
    kernels_backend: Literal["auto", "torch", "triton", "cuda"] = "auto"  # auto: triton on CUDA, torch on CPU
    compile: bool = False                      # torch.compile the model (the fused kernels run as custom ops)
    allow_tf32: bool = True                    # TF32 for matmuls/convolutions left in fp32 (Ampere and newer)
    seed: int = 0
    max_nonfinite_in_row: int = 10             # stop after this many skipped steps in a row
    bootstrap_encoder: bool = False            # no local encoder weights: train a small one first
    bootstrap_encoder_steps: int = 300
    # Testing aids: reuse the first batch every step; make the loss of these micro-steps NaN.
    debug_fixed_batch: bool = False
    debug_nonfinite_steps: list[int] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0                      # linear warm-up from 0 to lr over this many steps
    grad_clip: float = 1.0                     # max global grad norm; 0 disables clipping
    fused: Literal["auto", "true", "false"] = "auto"   # torch's fused AdamW (auto: on CUDA)


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999


@dataclass
class CheckpointConfig:
    every: int = 10_000                        # steps; 0: only at the end
    keep_last: int = 3
    resume: str = "auto"                       # auto: latest in output_dir/checkpoints; none; or a path
    export_ema: bool = True                    # write ema_fp32.pt (REPA layout) with each checkpoint
    # Fine-tune from these weights (model and EMA), read strict: an ema_fp32.pt or checkpoint directory, a
    # Hugging Face folder, or a REPA / REG / SiT .pt (engine.models.pretrained). A resume takes precedence.
    init_weights: Optional[str] = None


@dataclass
class LoggingConfig:
    log_every: int = 10                        # TensorBoard / metrics.jsonl period in steps
    progress_bar: bool = True
    tensorboard: bool = True
    wandb: bool = False                        # used only if installed
    wandb_project: str = "alignflow"
    sample_every: int = 0                      # EMA sample grid period in steps; 0: off


@dataclass
class SampleConfig:
    """Sampling for the periodic grids, the end of training and `engine.sample`."""

    num_steps: int = 50
    method: str = "euler"
    cfg_scale: float = 1.0
    num_images: int = 64                       # images written at the end of training
    batch_size: int = 32
    grid_images: int = 16
    seed: int = 0


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoders: list[EncoderConfig] = field(default_factory=list)
    latent: LatentConfig = field(default_factory=LatentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain mappings, with type checks
# ----------------------------------------------------------------------------------------------

def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_describe(inner)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(key: str, value: Any, tp) -> Any:
    """`value` checked against (and where lossless, converted to) the annotation `tp`."""
    bad = ConfigError(f"{key}={value!r} has the wrong type; allowed: {_describe(tp)}")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, value, arg)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {_describe(tp)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (inner,) = typing.get_args(tp) or (Any,)
        return [_convert(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise bad
        return value
    return value


def build_dataclass(cls, values: Any, prefix: str):
    """`cls(**values)` with unknown keys and wrong types reported as `prefix.key=value`, and the
    component's own validation errors prefixed with the section they came from."""
    if isinstance(values, cls):
        return values
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}={values!r} must be a mapping ({cls.__name__})")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]} is not a known key; allowed: {sorted(known)}")
    kwargs = {name: _convert(f"{prefix}.{name}", value, hints[name]) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{prefix}: {error}") from error


# ----------------------------------------------------------------------------------------------
# YAML and overrides
# ----------------------------------------------------------------------------------------------

def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`train.max_steps=10 optim.lr=3e-4 encoders.0.name=...` applied to the raw mapping."""
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {where} is not an index of a {len(node)}-item list")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {item!r}: {where} is not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {last} is not an index of a {len(node)}-item list")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def load_raw(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def from_dict(raw: dict) -> ExperimentConfig:
    raw = dict(raw)
    encoders = raw.pop("encoders", [])
    if not isinstance(encoders, list):
        raise ConfigError(f"encoders={encoders!r} must be a list of encoder mappings")
    cfg = build_dataclass(ExperimentConfig, raw, "config")
    cfg.encoders = [build_dataclass(EncoderConfig, e, f"encoders[{i}]") for i, e in enumerate(encoders)]
    return cfg


def load_config(path: str, overrides: list[str] = ()) -> ExperimentConfig:
    return from_dict(apply_overrides(load_raw(path), list(overrides)))


# ----------------------------------------------------------------------------------------------
# Checks across sections and against the machine
# ----------------------------------------------------------------------------------------------

def resolve_device(cfg: ExperimentConfig) -> str:
    import torch

    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.train.device


def resolve_precision(cfg: ExperimentConfig, device: str) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return cfg.train.precision


def grad_accum_steps(cfg: ExperimentConfig, world_size: int) -> int:
    micro = cfg.data.batch_size
    if cfg.train.grad_accum_steps is not None:
        return cfg.train.grad_accum_steps
    return cfg.train.global_batch_size // (world_size * micro)


def validate(cfg: ExperimentConfig, world_size: int = 1, cuda_available: bool | None = None) -> None:
    """Raise ConfigError for combinations that cannot run on this machine and world size."""
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    t, o = cfg.train, cfg.optim

    def bad(key, value, allowed):
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")

    for key, value, low in (("train.max_steps", t.max_steps, 1), ("train.global_batch_size", t.global_batch_size, 1),
                            ("train.max_nonfinite_in_row", t.max_nonfinite_in_row, 1),
                            ("train.bootstrap_encoder_steps", t.bootstrap_encoder_steps, 0),
                            ("optim.warmup_steps", o.warmup_steps, 0), ("checkpoint.every", cfg.checkpoint.every, 0),
                            ("checkpoint.keep_last", cfg.checkpoint.keep_last, 1),
                            ("logging.log_every", cfg.logging.log_every, 1),
                            ("logging.sample_every", cfg.logging.sample_every, 0),
                            ("sample.num_steps", cfg.sample.num_steps, 1), ("sample.num_images", cfg.sample.num_images, 0),
                            ("sample.batch_size", cfg.sample.batch_size, 1),
                            ("sample.grid_images", cfg.sample.grid_images, 1)):
        if value < low:
            bad(key, value, f"an integer >= {low}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        bad("train.max_minutes", t.max_minutes, "a positive number of minutes or null")
    if t.device == "cuda" and not cuda_available:
        bad("train.device", t.device, "'cpu' or 'auto' on a machine without CUDA")
    device = "cuda" if (t.device == "cuda" or (t.device == "auto" and cuda_available)) else "cpu"
    if t.precision == "fp16" and device == "cpu":
        bad("train.precision", t.precision, "'bf16', 'bf16-mixed' or 'fp32' on the CPU (fp16 needs CUDA)")
    if t.kernels_backend in ("triton", "cuda") and device == "cpu":
        bad("train.kernels_backend", t.kernels_backend,
            "'torch' or 'auto' on the CPU (the Triton interpreter is far too slow for training)")
    if t.zero_stage is not None and t.zero_stage not in (0, 1, 2, 3):
        bad("train.zero_stage", t.zero_stage, "0, 1, 2, 3 or null (take it from the DeepSpeed JSON)")
    if not os.path.exists(deepspeed_config_path(cfg)):
        bad("train.deepspeed_config", t.deepspeed_config, "an existing DeepSpeed JSON file (e.g. "
            "configs/deepspeed/zero2.json)")

    micro = cfg.data.batch_size
    if t.grad_accum_steps is not None:
        if t.grad_accum_steps < 1:
            bad("train.grad_accum_steps", t.grad_accum_steps, "a positive integer or null")
        if world_size * micro * t.grad_accum_steps != t.global_batch_size:
            bad("train.global_batch_size", t.global_batch_size,
                f"world size {world_size} x data.batch_size {micro} x train.grad_accum_steps "
                f"{t.grad_accum_steps} = {world_size * micro * t.grad_accum_steps}")
    elif t.global_batch_size % (world_size * micro):
        bad("train.global_batch_size", t.global_batch_size,
            f"a multiple of world size {world_size} x data.batch_size {micro} = {world_size * micro}")

    if not 0.0 < o.lr:
        bad("optim.lr", o.lr, "a positive number")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        bad("optim.betas", o.betas, "two numbers in [0, 1)")
    if o.grad_clip < 0:
        bad("optim.grad_clip", o.grad_clip, "a number >= 0 (0 disables clipping)")
    if o.fused == "true" and device == "cpu":
        bad("optim.fused", o.fused, "'auto' or 'false' on the CPU")
    if not 0.0 <= cfg.ema.decay < 1.0:
        bad("ema.decay", cfg.ema.decay, "a number in [0, 1)")

    m = cfg.model
    if len(cfg.encoders) != len(m.z_dims):
        bad("encoders", [getattr(e, "name", e) for e in cfg.encoders],
            f"one encoder per model.z_dims entry ({len(m.z_dims)}: {m.z_dims})")
    if m.reg and not cfg.encoders:
        bad("model.reg", m.reg, "false without an encoder (REG's class token comes from the encoder)")
    if cfg.data.num_classes is not None and cfg.data.num_classes != m.num_classes:
        bad("data.num_classes", cfg.data.num_classes, f"equal to model.num_classes={m.num_classes}")
    if cfg.model.num_classes < 1:
        bad("model.num_classes", cfg.model.num_classes, "a positive integer")
    if t.bootstrap_encoder and not cfg.encoders:
        bad("train.bootstrap_encoder", True, "false without encoders")


def deepspeed_config_path(cfg: ExperimentConfig) -> str:
    path = cfg.train.deepspeed_config
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO_ROOT, path)
