"""The experiment configuration: one typed dataclass per component, composed into `ExperimentConfig`,
loaded from YAML with dotted command-line overrides and validated before any work starts.

Each component owns its dataclass (`engine.models.ModelConfig`, `engine.transport.TransportConfig`,
`engine.data.DataConfig`, ...), built the one way (`engine.configurable.FromDict`), and checks its own
values; this module adds the trainer's own sections, the checks that span several sections or look
at the machine and the disk (`validate`), and the DeepSpeed JSON the trainer runs with
(`deepspeed_config`). Every error is one `ConfigError`: `<file>:<line>: <key>: <value>: <allowed>`.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from engine.configurable import ConfigError, FromDict, finite_number, invalid
from engine.data import DataConfig
from engine.metrics_library import metrics_library_problem, resolve_inception_weights
from engine.models import ModelConfig
from engine.models.encoders import EncoderConfig
from engine.models.latents import LatentConfig
from engine.transport import TransportConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "from_dict", "apply_overrides", "validate",
           "deepspeed_config", "locate"]


def _at_least(section, pairs) -> None:
    for key, low in pairs:
        value = getattr(section, key)
        if value < low:
            raise invalid(key, value, f"an integer >= {low}")


def _check_sampler(section) -> None:
    """The sampler settings that `sample` and `eval` share: a known `method`, a usable `cfg_scale`, and
    0 <= guidance_low <= guidance_high <= 1 (times in REPA's direction, t = 0 data)."""
    from engine.samplers import METHODS

    if section.method not in METHODS:
        raise invalid("method", section.method, f"one of {', '.join(METHODS)}")
    if not (finite_number(section.cfg_scale) and section.cfg_scale >= 0):
        raise invalid("cfg_scale", section.cfg_scale, "a finite number >= 0 (<= 1: no guidance)")
    low, high = section.guidance_low, section.guidance_high
    if not (finite_number(low) and 0 <= low <= 1):
        raise invalid("guidance_low", low, "a number in [0, 1] (t = 0 data, t = 1 noise)")
    if not (finite_number(high) and low <= high <= 1):
        raise invalid("guidance_high", high, f"a number in [guidance_low={low}, 1] (t = 0 data, t = 1 noise)")


# ----------------------------------------------------------------------------------------------
# The trainer's own sections
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainConfig(FromDict):
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
    # with compile, on CUDA: Inductor's CUDA graphs (mode "reduce-overhead") over the model's forward, its
    # backward and the fused encoders' forward; ZeRO-0/1/2, one micro-batch a step; opt-in, not measured yet
    cuda_graphs: bool = False
    allow_tf32: bool = True                    # TF32 for matmuls/convolutions left in fp32 (Ampere and newer)
    # under bf16-mixed: a persistent bf16 copy of every Linear weight and bias, written right after each optimizer
    # step and read by the matmuls instead of autocast's cast of the fp32 weight at every forward (the same
    # numbers, engine/bf16_copies.py); auto: on CUDA with ZeRO stage 0, 1 or 2 (ZeRO-3 partitions the weights)
    bf16_weight_copies: Literal["auto", "true", "false"] = "auto"
    # with the copies: the matmuls' weight gradients stay bf16 on the copies (no fp32 .grad; the same numbers,
    # engine/bf16_copies.py), read by optim.step_kernel alignflow; auto: on where every condition holds (the
    # copies, that kernel, ZeRO-0 on one rank, one micro-batch a step)
    bf16_weight_grads: Literal["auto", "true", "false"] = "auto"
    seed: int = 0
    max_nonfinite_in_row: int = 10             # stop after this many skipped steps in a row
    # A collective that waits longer ends the run with an error naming a lost peer (not a hang); it must
    # cover the longest wait of one rank for another (rank 0's sample grids and checkpoint writes)
    collective_timeout_s: float = 1800.0
    bootstrap_encoder: bool = False            # no local encoder weights: train a small one first
    bootstrap_encoder_steps: int = 300
    # Testing aids: reuse the first batch every step; make the loss of these micro-steps NaN.
    debug_fixed_batch: bool = False
    debug_nonfinite_steps: list[int] = field(default_factory=list)

    def __post_init__(self):
        _at_least(self, (("max_steps", 1), ("global_batch_size", 1), ("max_nonfinite_in_row", 1),
                         ("bootstrap_encoder_steps", 0), ("seed", 0)))
        if not (finite_number(self.collective_timeout_s) and 10 <= self.collective_timeout_s <= 86400):
            raise invalid("collective_timeout_s", self.collective_timeout_s, "a number of seconds from 10 to 86400")
        if self.max_minutes is not None and not (finite_number(self.max_minutes) and self.max_minutes > 0):
            raise invalid("max_minutes", self.max_minutes, "a positive number of minutes or null")
        if self.grad_accum_steps is not None and self.grad_accum_steps < 1:
            raise invalid("grad_accum_steps", self.grad_accum_steps, "a positive integer or null")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise invalid("zero_stage", self.zero_stage, "0, 1, 2, 3 or null (take it from the DeepSpeed JSON)")
        if not self.output_dir:
            raise invalid("output_dir", self.output_dir, "a directory path")


@dataclass
class OptimConfig(FromDict):
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0                      # linear warm-up from 0 to lr over this many steps
    grad_clip: float = 1.0                     # max global grad norm; 0 disables clipping
    fused: Literal["auto", "true", "false"] = "auto"   # torch's fused AdamW (auto: on CUDA)
    # clipping inside the fused AdamW step, no separate scaling pass (engine/optim.py; auto: on CUDA)
    fused_clip: Literal["auto", "true", "false"] = "auto"
    # the kernel of that clipped step: torch's fused AdamW, or AlignFlow's CUDA C++ one (csrc/adamw.cu; opt-in)
    step_kernel: Literal["torch", "alignflow"] = "torch"

    def __post_init__(self):
        if not (finite_number(self.lr) and self.lr > 0):
            raise invalid("lr", self.lr, "a finite positive number")
        if len(self.betas) != 2 or not all(finite_number(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise invalid("betas", self.betas, "two numbers in [0, 1)")
        if not (finite_number(self.eps) and self.eps > 0):
            raise invalid("eps", self.eps, "a finite positive number")
        if not (finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise invalid("weight_decay", self.weight_decay, "a finite number >= 0")
        if not (finite_number(self.grad_clip) and self.grad_clip >= 0):
            raise invalid("grad_clip", self.grad_clip, "a finite number >= 0 (0 disables clipping)")
        _at_least(self, (("warmup_steps", 0),))


@dataclass
class EMAConfig(FromDict):
    enabled: bool = True
    decay: float = 0.9999

    def __post_init__(self):
        if not (finite_number(self.decay) and 0.0 <= self.decay < 1.0):
            raise invalid("decay", self.decay, "a number in [0, 1)")


@dataclass
class CheckpointConfig(FromDict):
    every: int = 10_000                        # steps; 0: only at the end
    keep_last: int = 3
    resume: str = "auto"                       # auto: latest in output_dir/checkpoints; none; or a path
    export_ema: bool = True                    # write ema_fp32.pt (REPA layout) with each checkpoint
    # Fine-tune from these weights (model and EMA), read strict: an ema_fp32.pt or checkpoint directory, a
    # Hugging Face folder, or a REPA / REG / SiT .pt (engine.models.pretrained). A resume takes precedence.
    init_weights: Optional[str] = None

    def __post_init__(self):
        _at_least(self, (("every", 0), ("keep_last", 1)))
        if not self.resume:
            raise invalid("resume", self.resume, "'auto', 'none' or a checkpoint path")


@dataclass
class WandbConfig(FromDict):
    """Weights & Biases logging (pip install -e ".[wandb]"): scalars, sample grids and the config, on rank 0.
    A resumed run continues the same wandb run (its id is stored in the checkpoint)."""

    project: str = "alignflow"
    entity: Optional[str] = None               # None: wandb's default entity
    name: Optional[str] = None                 # None: the basename of train.output_dir
    mode: Optional[Literal["online", "offline", "disabled"]] = None  # None: WANDB_MODE, else online
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig(FromDict):
    log_every: int = 10                        # TensorBoard / metrics.jsonl / wandb period in steps
    progress_bar: bool = True
    tensorboard: bool = True
    wandb: Optional[WandbConfig] = None        # null: off; a mapping (may be {}): on, wandb must be installed
    sample_every: int = 0                      # EMA sample grid period in steps; 0: off

    def __post_init__(self):
        _at_least(self, (("log_every", 1), ("sample_every", 0)))


@dataclass
class SampleConfig(FromDict):
    """Sampling for the periodic grids, the end of training and `engine.sample`."""

    num_steps: int = 50
    method: str = "euler"
    cfg_scale: float = 1.0
    num_images: int = 64                       # images written at the end of training
    batch_size: int = 32
    grid_images: int = 16
    seed: int = 0
    # classifier-free guidance only where guidance_low <= t <= guidance_high, t in REPA's direction
    # (0 data, 1 noise): REPA's --guidance-low / --guidance-high
    guidance_low: float = 0.0
    guidance_high: float = 1.0

    def __post_init__(self):
        _check_sampler(self)
        _at_least(self, (("num_steps", 1), ("num_images", 0), ("batch_size", 1), ("grid_images", 1), ("seed", 0)))


@dataclass
class EvalConfig(FromDict):
    """Evaluation during training (engine.evaluate), every `every` steps and at the end of the run: the
    EMA model samples `num_images` images over all ranks (global batch b of `batch_size` images with seed
    `seed + b`, labels i % num_classes), and their metrics are logged and plotted: FID, sFID, IS,
    precision and recall against the ADM reference batch `ref` (needs Inception weights), and the
    Frechet distance and linear-probe class accuracy in the class-token features of the alignment
    encoder `encoders[0]` against `real_images` training images (`encoder_metrics`, no download)."""

    every: int = 0                             # steps; 0: off
    at_start: bool = False                     # also score the initial (random) model, at step 0
    num_images: int = 10_000
    ref: Optional[str] = None                  # ADM reference batch (.npz); null: no Inception metrics
    inception_weights: Optional[str] = None    # default: torch-fidelity's file in the torch hub cache
    random_inception: bool = False             # TESTS ONLY: random Inception weights, meaningless numbers
    encoder_metrics: bool = True
    real_images: int = 10_000
    num_steps: int = 50
    method: str = "euler"
    cfg_scale: float = 1.0
    batch_size: int = 32
    seed: int = 0
    guidance_low: float = 0.0                  # as sample.guidance_low / guidance_high
    guidance_high: float = 1.0

    def __post_init__(self):
        _check_sampler(self)
        _at_least(self, (("every", 0), ("num_images", 2), ("real_images", 2), ("num_steps", 1), ("batch_size", 1),
                         ("seed", 0)))
        if self.random_inception and self.inception_weights is not None:
            raise invalid("random_inception", True, "false when eval.inception_weights is set")


# The settings that define the evaluation curve: a resumed run must keep them (eval.every may change).
EVAL_CURVE_KEYS = ("num_images", "ref", "random_inception", "encoder_metrics", "real_images", "num_steps", "method",
                   "cfg_scale", "batch_size", "seed", "guidance_low", "guidance_high")


@dataclass
class ExperimentConfig(FromDict):
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
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# YAML (with the line of every key, duplicates refused) and overrides
# ----------------------------------------------------------------------------------------------

OVERRIDE = "<command line>"


class _Origin:
    """Where each key of a config was written: {dotted key: line} of one YAML file, and the keys set
    by command-line overrides."""

    def __init__(self, file: str | None = None, lines: dict | None = None):
        self.file, self.lines, self.overridden = file, dict(lines or {}), set()

    def locate(self, error: ConfigError) -> ConfigError:
        if error.file is not None or not error.key:
            return error
        key = error.key
        while True:
            if key in self.overridden:
                return error.at(OVERRIDE, None)
            if key in self.lines:
                return error.at(self.file, self.lines[key])
            cut = max(key.rfind("."), key.rfind("["))
            if cut <= 0:
                return error.at(self.file, None) if self.file else error
            key = key[:cut]


def _dotted(prefix: str, key) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _key_lines(node, prefix: str, lines: dict, file: str) -> None:
    """{dotted key: 1-based line} for every key below `node`; a key written twice is an error."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = _dotted(prefix, key_node.value)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(key, allowed=f"duplicate key (first written at line "
                                  f"{lines[key]}); write each key once", file=file, line=line)
            lines[key] = line
            _key_lines(value_node, key, lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = _dotted(prefix, i)
            lines[key] = item.start_mark.line + 1
            _key_lines(item, key, lines, file)


def load_raw(path: str) -> dict:
    """The YAML mapping in `path` (errors as `read_yaml`)."""
    return read_yaml(path)[0]


def read_yaml(path: str) -> tuple[dict, _Origin]:
    """The YAML mapping in `path` and where each key was written. Syntax errors, an empty file, a top
    level that is not a mapping and duplicate keys are `ConfigError`s with the file and line."""
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "an existing YAML file")
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("", path, f"cannot read the config file ({error})", file=path) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError("", allowed="the file is empty; it must be a mapping of sections (model, data, "
                              "train, ...)", file=path)
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError("", allowed="the top level must be a mapping of sections (model, data, train, ...)",
                              file=path, line=node.start_mark.line + 1)
        lines: dict = {}
        _key_lines(node, "", lines, path)
        raw = loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        what = " ".join(str(part) for part in (error.context, error.problem) if part)
        raise ConfigError("", allowed=f"YAML syntax error: {what}" + (" (indent with spaces, not tabs)"
                                                                     if "\\t" in what or "\t" in what else ""),
                          file=path, line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as error:
        raise ConfigError("", allowed=f"YAML error: {error}", file=path) from None
    finally:
        loader.dispose()
    return raw, _Origin(path, lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError("", item, "an override must look like section.key=value", file=OVERRIDE)
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(key.strip(), raw, f"not a YAML value ({str(error).splitlines()[0]})", file=OVERRIDE) from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str], origin: _Origin | None = None) -> dict:
    """`train.max_steps=10 optim.lr=3e-4 encoders.0.name=...` applied to the raw mapping."""
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        dotted = ""
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(where, item, f"an index of the {len(node)}-item list", file=OVERRIDE)
                node = node[int(part)]
                dotted = _dotted(dotted, int(part))
            else:
                node = node.setdefault(part, {})
                dotted = _dotted(dotted, part)
                if not isinstance(node, (dict, list)):
                    raise ConfigError(where, item, "not a section", file=OVERRIDE)
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(".".join(path), item, f"an index of the {len(node)}-item list", file=OVERRIDE)
            node[int(last)] = value
            dotted = _dotted(dotted, int(last))
        else:
            node[last] = value
            dotted = _dotted(dotted, last)
        if origin is not None:
            origin.overridden.add(dotted)
    return raw


def from_dict(raw: dict, origin: _Origin | None = None) -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.from_dict(raw)
    except ConfigError as error:
        raise (origin.locate(error) if origin is not None else error) from None
    cfg._origin = origin or _Origin()
    return cfg


def load_config(path: str, overrides: list[str] = ()) -> ExperimentConfig:
    raw, origin = read_yaml(path)
    return from_dict(apply_overrides(raw, list(overrides), origin), origin)


def locate(error: ConfigError, cfg: ExperimentConfig | None) -> ConfigError:
    """`error` with the file and line where its key was written (when `cfg` came from a file)."""
    origin = getattr(cfg, "_origin", None)
    return origin.locate(error) if origin is not None else error


# ----------------------------------------------------------------------------------------------
# Checks across sections, against the machine and the disk
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


def resolve_fused_clip(cfg: ExperimentConfig, device: str, precision: str) -> bool:
    """optim.fused_clip: 'auto' is on on CUDA when there is clipping to fold (optim.grad_clip > 0),
    under any precision but fp16 (DeepSpeed's fp16 optimizer without ZeRO clips by itself)."""
    o = cfg.optim
    if o.fused_clip == "auto":
        return device == "cuda" and o.grad_clip > 0 and precision != "fp16" and o.fused != "false"
    return o.fused_clip == "true"


def resolve_bf16_weight_copies(cfg: ExperimentConfig, device: str, precision: str, zero_stage: int) -> bool:
    """train.bf16_weight_copies: 'auto' is on where autocast casts fp32 weights to bf16 (bf16-mixed), on CUDA
    (on the CPU the default path stays as it was), with ZeRO stage 0-2 (stage 3 partitions the weights)."""
    mode = cfg.train.bf16_weight_copies
    if mode == "auto":
        return device == "cuda" and precision == "bf16-mixed" and zero_stage in (0, 1, 2)
    return mode == "true"


def bf16_weight_grads_blocker(cfg: ExperimentConfig, device: str, precision: str, zero_stage: int, world_size: int,
                              accum: int) -> str | None:
    """Why train.bf16_weight_grads cannot be on here, or None where it can."""
    if not resolve_bf16_weight_copies(cfg, device, precision, zero_stage):
        return "train.bf16_weight_copies off (the gradients land on the copies)"
    if cfg.optim.step_kernel != "alignflow":
        return f"optim.step_kernel {cfg.optim.step_kernel!r} (torch's fused AdamW takes fp32 gradients of fp32 params)"
    if zero_stage != 0:
        return f"ZeRO stage {zero_stage} (its gradient hooks and buckets read each parameter's .grad)"
    if world_size != 1:
        return f"world size {world_size} (DeepSpeed's gradient all-reduce reads each parameter's .grad)"
    if accum != 1:
        return f"{accum} micro-batches a step (bf16 gradients would be summed in bf16)"
    return None


def resolve_bf16_weight_grads(cfg: ExperimentConfig, device: str, precision: str, zero_stage: int, world_size: int,
                              accum: int) -> bool:
    """train.bf16_weight_grads: 'auto' is on where nothing blocks it; 'true' where something does raises
    ConfigError naming it."""
    mode = cfg.train.bf16_weight_grads
    if mode == "false":
        return False
    blocker = bf16_weight_grads_blocker(cfg, device, precision, zero_stage, world_size, accum)
    if mode == "true" and blocker:
        raise ConfigError("train.bf16_weight_grads", mode, f"'auto' or 'false' with {blocker}")
    return blocker is None


def grad_accum_steps(cfg: ExperimentConfig, world_size: int) -> int:
    micro = cfg.data.batch_size
    if cfg.train.grad_accum_steps is not None:
        return cfg.train.grad_accum_steps
    return cfg.train.global_batch_size // (world_size * micro)


def validate(cfg: ExperimentConfig, world_size: int = 1, cuda_available: bool | None = None,
             disk: bool = True) -> None:
    """Raise ConfigError for combinations that cannot run on this machine and world size, and (with
    `disk`) for paths that cannot work: everything that can be known without loading a dataset or a
    model. The error carries the file and line of its key where the config came from a file."""
    try:
        _validate(cfg, world_size, cuda_available, disk)
    except ConfigError as error:
        raise locate(error, cfg) from None


def _validate(cfg: ExperimentConfig, world_size: int, cuda_available: bool | None, disk: bool) -> None:
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    t, o = cfg.train, cfg.optim

    def bad(key, value, allowed):
        raise ConfigError(key, value, allowed)

    if t.device == "cuda" and not cuda_available:
        bad("train.device", t.device, "'cpu' or 'auto' on a machine without CUDA")
    device = "cuda" if (t.device == "cuda" or (t.device == "auto" and cuda_available)) else "cpu"
    if t.precision == "fp16" and device == "cpu":
        bad("train.precision", t.precision, "'bf16', 'bf16-mixed' or 'fp32' on the CPU (fp16 needs CUDA)")
    if t.kernels_backend in ("triton", "cuda") and device == "cpu":
        bad("train.kernels_backend", t.kernels_backend,
            "'torch' or 'auto' on the CPU (the Triton interpreter is far too slow for training)")
    if o.fused == "true" and device == "cpu":
        bad("optim.fused", o.fused, "'auto' or 'false' on the CPU")
    if o.fused_clip == "true":
        if o.fused == "false":
            bad("optim.fused_clip", o.fused_clip, "'auto' or 'false' with optim.fused 'false' (the clip runs inside "
                                                  "torch's fused AdamW kernel)")
        if o.grad_clip == 0:
            bad("optim.fused_clip", o.fused_clip, "'auto' or 'false' with optim.grad_clip 0 (no clipping to fold)")
        if resolve_precision(cfg, device) == "fp16":
            bad("optim.fused_clip", o.fused_clip, "'auto' or 'false' with train.precision fp16")
    if o.step_kernel == "alignflow":
        precision = resolve_precision(cfg, device)
        if precision == "fp16":
            bad("optim.step_kernel", o.step_kernel, "'torch' with train.precision fp16 (the AlignFlow kernel has no "
                                                    "skip of overflowed steps)")
        if not resolve_fused_clip(cfg, device, precision):
            bad("optim.step_kernel", o.step_kernel, f"'torch' unless optim.fused_clip is on (it is "
                                                    f"{o.fused_clip!r} on {device}: the kernel runs ClippedAdamW's step)")

    micro = cfg.data.batch_size
    if t.cuda_graphs:
        if not t.compile:
            bad("train.cuda_graphs", True, "false unless train.compile is true (the graphs are Inductor's, "
                                           "torch.compile mode 'reduce-overhead')")
        if device == "cpu":
            bad("train.cuda_graphs", True, "false on the CPU (CUDA graphs need CUDA)")
        accumulation = t.grad_accum_steps or t.global_batch_size // max(1, world_size * micro)
        if accumulation > 1:
            bad("train.cuda_graphs", True, f"false with gradient accumulation ({accumulation} micro-batches a step: "
                                           "each replay of the backward graph overwrites the gradients it wrote "
                                           "before)")
    if t.grad_accum_steps is not None:
        if world_size * micro * t.grad_accum_steps != t.global_batch_size:
            bad("train.global_batch_size", t.global_batch_size,
                f"world size {world_size} x data.batch_size {micro} x train.grad_accum_steps "
                f"{t.grad_accum_steps} = {world_size * micro * t.grad_accum_steps}")
    elif t.global_batch_size % (world_size * micro):
        bad("train.global_batch_size", t.global_batch_size,
            f"a multiple of world size {world_size} x data.batch_size {micro} = {world_size * micro}")
    ds = deepspeed_config(cfg, world_size, resolve_precision(cfg, device), device)  # the JSON file and its merge
    if t.cuda_graphs and ds["zero_optimization"]["stage"] == 3:
        bad("train.cuda_graphs", True, "false under ZeRO-3 (its parameter-gather hooks run inside the forward "
                                       "and backward, between the graphs)")

    if t.bf16_weight_copies == "true":
        if resolve_precision(cfg, device) != "bf16-mixed":
            bad("train.bf16_weight_copies", t.bf16_weight_copies, f"'auto' or 'false' with train.precision "
                                                    f"{resolve_precision(cfg, device)!r} (the copies stand in for "
                                                    "bf16-mixed's autocast casts of fp32 weights)")
        if ds["zero_optimization"]["stage"] == 3:
            bad("train.bf16_weight_copies", t.bf16_weight_copies, "'auto' or 'false' under ZeRO-3 (its parameters are partitioned)")
    resolve_bf16_weight_grads(cfg, device, resolve_precision(cfg, device), ds["zero_optimization"]["stage"], world_size,
                              grad_accum_steps(cfg, world_size))  # 'true' where it cannot run: ConfigError

    m = cfg.model
    if len(cfg.encoders) != len(m.z_dims):
        bad("encoders", [getattr(e, "name", e) for e in cfg.encoders],
            f"one encoder per model.z_dims entry ({len(m.z_dims)}: {m.z_dims})")
    if m.reg and not cfg.encoders:
        bad("model.reg", m.reg, "false without an encoder (REG's class token comes from the encoder)")
    if cfg.data.num_classes is not None and cfg.data.num_classes != m.num_classes:
        bad("data.num_classes", cfg.data.num_classes, f"equal to model.num_classes={m.num_classes}")
    if t.bootstrap_encoder and not cfg.encoders:
        bad("train.bootstrap_encoder", True, "false without encoders")
    if cfg.logging.wandb is not None and cfg.logging.wandb.mode != "disabled":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            bad("logging.wandb", dataclasses.asdict(cfg.logging.wandb),
                "null, or a mapping once wandb is installed (pip install -e \".[wandb]\")")
    if cfg.sample.cfg_scale > 1.0 and m.class_dropout_prob == 0:
        bad("sample.cfg_scale", cfg.sample.cfg_scale, "1 for a model trained without label dropout "
            "(model.class_dropout_prob=0 learns no unconditional velocity)")
    _validate_eval(cfg, disk)
    if disk:
        _check_disk(cfg)


def _validate_eval(cfg: ExperimentConfig, disk: bool) -> None:
    """The `eval` section against the others, the installed packages and the disk: a missing metrics
    package, reference batch or Inception weights stops the run now, not at the first evaluation (after
    the encoder bootstrap and the first training steps). A metric that is on is required: no setting
    here is 'auto', so none is dropped with a warning."""
    e = cfg.eval
    if not e.every:
        return
    if e.ref is None and not e.encoder_metrics:
        raise ConfigError("eval.encoder_metrics", False, "true, or a reference batch in eval.ref (otherwise there "
                          "is nothing to evaluate; eval.every=0 turns evaluation off)")
    if e.encoder_metrics and not cfg.encoders:
        raise ConfigError("eval.encoder_metrics", True, "false without encoders (the figure is measured in "
                          "encoders[0]'s features)")
    if e.encoder_metrics:
        problem = metrics_library_problem()
        if problem is not None:
            raise ConfigError("eval.encoder_metrics", True, f"false, or install torch-fidelity (pip install -e "
                              f"\".[eval]\"), whose Frechet distance the encoder figure uses: {problem}")
    if e.ref is None or not disk:
        return
    if not os.path.isfile(e.ref):
        raise ConfigError("eval.ref", e.ref, "an existing ADM reference batch (.npz with arr_0), e.g. "
                          "VIRTUAL_imagenet256_labeled.npz")
    problem = metrics_library_problem()
    if problem is not None:
        raise ConfigError("eval.ref", e.ref, f"null, or install torch-fidelity (pip install -e \".[eval]\"), whose "
                          f"Inception network and metrics it needs: {problem}")
    if not e.random_inception:
        try:
            resolve_inception_weights(e.inception_weights)
        except FileNotFoundError as error:
            raise ConfigError("eval.inception_weights", e.inception_weights, f"eval.ref is set but {error}") from None


def _writable_dir(key: str, path: str) -> None:
    """`path` is a directory this process can write, or can be created as one."""
    probe = os.path.abspath(path)
    if os.path.exists(probe):
        if not os.path.isdir(probe):
            raise ConfigError(key, path, "a directory (this path is a file)")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(key, path, "a directory this user can write (permission denied)")
        return
    parent = os.path.dirname(probe)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(key, path, f"a directory path ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(key, path, f"a directory this user can create ({parent} is not writable)")


def _check_disk(cfg: ExperimentConfig) -> None:
    """What the disk and the installed packages can tell before any data or model is loaded."""
    t, d = cfg.train, cfg.data
    _writable_dir("train.output_dir", t.output_dir)
    if d.source == "builtin":
        _writable_dir("data.root", d.root)
    elif d.source == "webdataset":
        if not (os.path.isdir(d.root) or (os.path.isfile(d.root) and d.root.endswith(".tar"))):
            raise ConfigError("data.root", d.root, "an existing directory of .tar shards or a .tar file")
    elif not os.path.isdir(d.root):
        raise ConfigError("data.root", d.root, "an existing directory (root/<class>/<image>)")
    if d.latents_root is not None:
        from engine.data.latent_shards import META

        if not os.path.isfile(os.path.join(d.latents_root, META)):
            raise ConfigError("data.latents_root", d.latents_root,
                              f"a directory of latent shards written by engine.preprocess (no {META})")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        raise ConfigError("checkpoint.resume", resume, "'auto', 'none' or an existing checkpoint directory")
    if cfg.encoders:
        import timm

        for i, enc in enumerate(cfg.encoders):
            if not timm.is_model(enc.timm_name.split(".")[0]):
                raise ConfigError(f"encoders[{i}].name", enc.name, "an alias (dinov2-vit-b, ...) or a model "
                                  "name timm knows (timm.list_models())")
            if enc.pretrained and enc.weights_path is not None and not os.path.isfile(enc.weights_path):
                raise ConfigError(f"encoders[{i}].weights_path", enc.weights_path, "an existing weights file")
    lat = cfg.latent
    channels = downsample = None
    if lat.kind == "identity":
        channels, downsample = 3, 1
    elif lat.kind == "module":
        module_name, name = lat.path.split(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 (any failure to import is the config's problem)
            raise ConfigError("latent.path", lat.path, f"an importable module ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from None
        if not callable(getattr(module, name, None)):
            raise ConfigError("latent.path", lat.path, f"a callable factory ({module_name} has no {name!r})")
    elif os.path.isfile(os.path.join(lat.path, lat.subfolder or "", "config.json")):
        with open(os.path.join(lat.path, lat.subfolder or "", "config.json")) as f:
            vae = json.load(f)
        if "latent_channels" in vae and "block_out_channels" in vae:
            channels, downsample = vae["latent_channels"], 2 ** (len(vae["block_out_channels"]) - 1)
    check_latent_grid(cfg, channels, downsample)


def check_latent_grid(cfg: ExperimentConfig, channels: int | None, downsample: int | None) -> None:
    """The model's input must be the latent grid the data gives, or the first step fails deep in the
    patch embedding (or, for a square grid of the wrong side, trains on the wrong positions).
    `channels`/`downsample`: the latent space's (None where it is not known before it is built)."""
    d, m = cfg.data, cfg.model
    kind = f"latent.kind={cfg.latent.kind!r}"
    if d.latents_root is not None:
        from engine.data.latent_shards import read_meta

        meta = read_meta(d.latents_root)
        shard_channels, side = meta["shape"][:2]
        source = f"the latent shards at data.latents_root={d.latents_root!r}"
        # The shards train the model; latent.* decodes its samples: they must be one latent space.
        if channels is not None and (channels != shard_channels or side * downsample != d.resolution):
            raise ConfigError("latent.kind", cfg.latent.kind,
                              f"the latent space of {source} ({shard_channels} x {side} x {side} latents of "
                              f"{d.resolution} px images), but it gives {channels} channels at {downsample}x "
                              "downsampling")
        channels = shard_channels
    else:
        if channels is None:
            return
        if d.resolution % downsample:
            raise ConfigError("data.resolution", d.resolution, f"a multiple of {downsample} ({kind} downsamples "
                              f"{downsample}x)")
        side = d.resolution // downsample
        source = f"{kind} at data.resolution={d.resolution} (downsampling {downsample}x)"
    if m.in_channels != channels:
        raise ConfigError("model.in_channels", m.in_channels, f"{channels} ({source} gives {channels} channels)")
    if m.input_size != side:
        raise ConfigError("model.input_size", m.input_size, f"{side} ({source} gives a {side}x{side} grid)")


# ----------------------------------------------------------------------------------------------
# The DeepSpeed JSON
# ----------------------------------------------------------------------------------------------

OWNED_BY_EXPERIMENT = ("optimizer", "scheduler")


def deepspeed_config_path(cfg: ExperimentConfig) -> str:
    path = cfg.train.deepspeed_config
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO_ROOT, path)


def checks_grad_overflow(ds_bf16: dict, fused_clip: bool) -> bool:
    """bf16.check_grad_overflow of the trainer's DeepSpeed JSON, given its file's bf16 section: the
    file's value where it sets one (true keeps DeepSpeed's check beside ClippedAdamW's: the same step
    is skipped, at DeepSpeed's cost); else off with optim.fused_clip, whose ClippedAdamW skips a step
    with non-finite gradients on the device (engine/optim.py), and DeepSpeed's default (true) without."""
    if "check_grad_overflow" in ds_bf16:
        return bool(ds_bf16["check_grad_overflow"])
    return not fused_clip


def deepspeed_config(cfg: ExperimentConfig, world_size: int, precision: str, device_type: str = "cuda") -> dict:
    """The DeepSpeed JSON the trainer runs with: the file `train.deepspeed_config` with the experiment's
    batch sizes, precision, clipping and ZeRO stage (the experiment config owns those)."""
    key = "train.deepspeed_config"
    path = deepspeed_config_path(cfg)
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(key, cfg.train.deepspeed_config,
                          "an existing DeepSpeed JSON file (e.g. configs/deepspeed/zero2.json)") from None
    except (OSError, ValueError) as error:
        raise ConfigError(key, cfg.train.deepspeed_config, f"a readable JSON file ({error})") from None
    if not isinstance(ds, dict):
        raise ConfigError(key, cfg.train.deepspeed_config, "a JSON object")
    for section in OWNED_BY_EXPERIMENT:
        if section in ds:
            raise ConfigError(key, cfg.train.deepspeed_config,
                              f"a file without a '{section}' section; the experiment config owns it (optim.*)")
    accum = grad_accum_steps(cfg, world_size)
    batch = {"train_batch_size": cfg.train.global_batch_size,
             "train_micro_batch_size_per_gpu": cfg.data.batch_size,
             "gradient_accumulation_steps": accum}
    for name, value in batch.items():
        if name in ds and ds[name] not in ("auto", value):
            raise ConfigError(key, cfg.train.deepspeed_config,
                              f"{name}={ds[name]!r} in it disagrees with the experiment ({value}); allowed: "
                              "'auto' or leave it out")
        ds[name] = value
    ds["gradient_clipping"] = cfg.optim.grad_clip
    fused_clip = resolve_fused_clip(cfg, device_type, precision)
    ds["bf16"] = dict(ds.get("bf16", {}), enabled=precision == "bf16",
                      check_grad_overflow=checks_grad_overflow(ds.get("bf16", {}), fused_clip))
    ds["fp16"] = dict(ds.get("fp16", {}), enabled=precision == "fp16")
    if precision == "bf16-mixed" or "torch_autocast" in ds:  # DeepSpeed's autocast around the model's forward
        ds["torch_autocast"] = dict(ds.get("torch_autocast", {}), enabled=precision == "bf16-mixed",
                                    dtype="bfloat16")
    zero = dict(ds.get("zero_optimization", {}))
    if cfg.train.zero_stage is not None:
        zero["stage"] = cfg.train.zero_stage
    zero.setdefault("stage", 0)
    if zero["stage"] not in (0, 1, 2, 3):
        raise ConfigError(key, cfg.train.deepspeed_config,
                          f"zero_optimization.stage={zero['stage']!r} in it; allowed: 0, 1, 2 or 3")
    if device_type == "cpu":  # no streams to overlap with on the CPU; gloo then runs one collective at a time
        zero["overlap_comm"] = False
    ds["zero_optimization"] = zero
    if zero["stage"] == 0 and fused_clip:
        ds["gradient_clipping"] = 0.0  # without ZeRO the optimizer clips (engine/optim.py); ZeRO hands it its norm
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW, wrapped by the ZeRO optimizer
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
