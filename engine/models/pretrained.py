"""Weights made elsewhere: released SiT, REPA and REG checkpoints (`.pt`), safetensors files, and the
Hugging Face Hub layout (`config.json` + `model.safetensors`), read into our SiT with `strict=True`.

What a file may hold, and how it is read (the key mapping):

    REPA / REG train.py checkpoint   {"model", "ema", "opt", "args", "steps"}: "ema" is read ("model" if
                                     there is no "ema"); "args" (REPA's argparse options) gives the
                                     encoder depth, the path, the class dropout and the class count
    REPA's released last.pt          the EMA state dict itself (with projectors)
    SiT's SiT-XL-2-256x256.pt        the state dict itself, trained with learn_sigma=True (the final
                                     layer gives 2 x 4 channels: model.learn_sigma) and no projectors,
                                     in SiT's time direction (t = 1 data: transport.reversed_time)
    our ema_fp32.pt                  {"ema", "steps", "config"}: the config is ours
    *.safetensors                    a state dict

REPA's and REG's parameter names are ours (engine.models.sit follows REPA's models/sit.py), so the
mapping is: the prefixes "module." (DDP) and "_orig_mod." (torch.compile) are removed, and the
"decoder_blocks.i" of REPA's early ("--legacy") checkpoints become "blocks.{i + encoder_depth}", as
REPA's utils.load_legacy_checkpoints does. Nothing else is renamed.

The model's shape is read from the tensors (`model_config_from_state_dict`): width, depth, patch,
channels, grid, classes, projector widths, qk-norm, REG, learn_sigma, CAR-Flow shifts; what shapes
cannot tell (the number of heads when there is no qk-norm, the encoder depth, whether the last
embedding row is the null class) comes from the checkpoint's args, the preset of that width and
depth, or the config the user gives.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

import torch

from .sit import PRESETS, ModelConfig

log = logging.getLogger("engine.models.pretrained")

PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------
# Reading a file
# ----------------------------------------------------------------------------------------------

def _torch_load(path: str):
    """torch.load without arbitrary code: tensors, containers, and REPA's argparse.Namespace of options."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unpickling error names a type we refuse to run
        raise ValueError(f"cannot read checkpoint {path!r} as tensors ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); it must be a state dict or "
                         "a REPA/REG/SiT/AlignFlow checkpoint") from error


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def map_keys(state: dict, encoder_depth: int | None = None) -> dict:
    """Our parameter names for a REPA/REG/SiT state dict (see the module docstring)."""
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("decoder_blocks."):
            if encoder_depth is None:
                raise ValueError("the checkpoint has REPA's legacy decoder_blocks; its encoder depth is needed to "
                                 "number them (set model.encoder_depth)")
            _, index, rest = key.split(".", 2)
            key = f"blocks.{int(index) + encoder_depth}.{rest}"
        if key in out:
            raise ValueError(f"two tensors of the checkpoint map to {key!r}")
        out[key] = value
    return out


def read_checkpoint(path: str) -> dict:
    """{"state": state dict in our names, "args": REPA/REG options as a dict or None, "config": our
    config dict or None, "format": "alignflow" | "repa" | "state_dict"} of a .pt/.pth/.safetensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        payload = load_file(path)
    else:
        payload = _torch_load(path)
    args = config = None
    if _is_state_dict(payload):
        state, fmt = payload, "state_dict"
    elif isinstance(payload, dict) and (_is_state_dict(payload.get("ema")) or _is_state_dict(payload.get("model"))):
        state = payload["ema"] if _is_state_dict(payload.get("ema")) else payload["model"]
        config = payload.get("config") if isinstance(payload.get("config"), dict) else None
        raw_args = payload.get("args")
        if isinstance(raw_args, argparse.Namespace):
            raw_args = vars(raw_args)
        args = dict(raw_args) if isinstance(raw_args, dict) else None
        fmt = "alignflow" if config else ("repa" if args is not None else "state_dict")
    else:
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"checkpoint {path!r} holds no state dict (top level: {keys}); expected a state dict or a "
                         "dict with 'ema' or 'model'")
    encoder_depth = (args or {}).get("encoder_depth") or ((config or {}).get("model") or {}).get("encoder_depth")
    return dict(state=map_keys(state, encoder_depth), args=args, config=config, format=fmt)


# ----------------------------------------------------------------------------------------------
# The model a state dict describes
# ----------------------------------------------------------------------------------------------

def _preset_for(depth: int, hidden: int, patch: int) -> str | None:
    for name, (d, h, _, p) in PRESETS.items():
        if (d, h, p) == (depth, hidden, patch):
            return name
    return None


def model_config_from_state_dict(state: dict, args: dict | None = None, base: dict | None = None) -> dict:
    """The ModelConfig keys that `state` (our names) fixes, as a dict; `args` (REPA's options) and `base`
    (the user's model section) fill in what the shapes cannot tell."""
    base = dict(base or {})
    args = args or {}
    try:
        D = state["pos_embed"].shape[-1]
        tokens = state["pos_embed"].shape[1]
        _, C, p, _ = state["x_embedder.proj.weight"].shape
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        out_features = state["final_layer.linear.weight"].shape[0]
        fc1 = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"the checkpoint is not a SiT state dict: it has no {error.args[0]!r}") from None
    reg = "cls_projectors2.weight" in state
    grid = math.isqrt(tokens - int(reg))
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    z_dims = [state[f"projectors.{j}.4.weight"].shape[0] for j in range(len(
        {k.split(".")[1] for k in state if k.startswith("projectors.")}))]
    if out_features not in (p * p * C, 2 * p * p * C):
        raise ValueError(f"final_layer.linear gives {out_features} features; a SiT with patch {p} and {C} channels "
                         f"gives {p * p * C} (or {2 * p * p * C} with learn_sigma)")
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    cfg: dict[str, Any] = dict(input_size=grid * p, in_channels=int(C), depth=depth, hidden_size=int(D),
                               patch_size=int(p), z_dims=z_dims, qk_norm=qk_norm, reg=reg,
                               learn_sigma=out_features == 2 * p * p * C, mlp_ratio=fc1 / D)
    if z_dims:
        cfg["projector_dim"] = int(state["projectors.0.0.weight"].shape[0])
    preset = _preset_for(depth, D, p)
    if preset is not None:
        cfg["name"] = preset
        cfg["num_heads"] = PRESETS[preset][2]
    if qk_norm:
        cfg["num_heads"] = D // state["blocks.0.attn.q_norm.weight"].shape[0]
    elif "num_heads" not in cfg:
        if base.get("num_heads") is None:
            raise ValueError(f"the checkpoint's model (width {D}, depth {depth}, patch {p}) is no SiT preset and "
                             "its shapes do not tell the number of heads; set model.num_heads")
        cfg["num_heads"] = int(base["num_heads"])
    # The embedding table has num_classes rows, plus the null class when trained with label dropout.
    if "num_classes" in args:
        dropout = float(args.get("cfg_prob", 0.1))
        cfg.update(num_classes=int(args["num_classes"]), class_dropout_prob=dropout)
    elif "num_classes" in base and rows in (base["num_classes"], base["num_classes"] + 1):
        cfg["num_classes"] = int(base["num_classes"])
        if rows == base["num_classes"]:
            cfg["class_dropout_prob"] = 0.0
        elif not base.get("class_dropout_prob", 0.1) > 0:
            cfg["class_dropout_prob"] = 0.1
    else:
        cfg["num_classes"] = int(rows) - 1  # SiT, REPA and REG all train with label dropout
        if not base.get("class_dropout_prob", 0.1) > 0:
            cfg["class_dropout_prob"] = 0.1
    if args.get("encoder_depth") is not None:
        cfg["encoder_depth"] = int(args["encoder_depth"])
    if "qk_norm" in args:
        cfg["qk_norm"] = bool(args["qk_norm"])
    shifts = {name: state[f"car_{name}_shift.net.3.weight"] for name in ("source", "target")
              if f"car_{name}_shift.net.3.weight" in state}
    if shifts:
        cfg["car_flow"] = "joint" if len(shifts) == 2 else next(iter(shifts))
        weight = next(iter(shifts.values()))
        cfg["car_flow_rank"] = int(weight.shape[1])
        cfg["car_flow_shape"] = "channel" if weight.shape[0] == C else "full"
    else:
        cfg["car_flow"] = "none"
    return cfg


def transport_from_args(args: dict | None, learn_sigma: bool) -> dict:
    """The transport keys a foreign checkpoint implies: REPA's --path-type and --weighting, and SiT's time
    direction for a learn_sigma checkpoint without REPA options (SiT's own releases)."""
    out = {}
    if args:
        if args.get("path_type") in ("linear", "cosine"):
            out["path"] = args["path_type"]
        if args.get("weighting") == "lognormal":
            out["time_sampling"] = "lognormal"
        if "proj_coeff" in args:
            out["proj_coeff"] = float(args["proj_coeff"])
    elif learn_sigma:
        out["reversed_time"] = True
    return out


def check_model_matches(state_cfg: dict, model_cfg: ModelConfig, source: str) -> None:
    """Raise naming the first model.* key where the config disagrees with the checkpoint's tensors."""
    for key, value in state_cfg.items():
        mine = getattr(model_cfg, key)
        if key == "mlp_ratio":
            same = abs(mine - value) < 1e-9
        else:
            same = mine == value
        if not same:
            raise ValueError(f"model.{key}={mine!r} but {source} holds a model with {key}={value!r}; "
                             f"allowed: {value!r}")


# ----------------------------------------------------------------------------------------------
# One entry point: an experiment config and its weights from any of the formats
# ----------------------------------------------------------------------------------------------

def resolve_weights(path: str) -> str:
    """The one file (or Hub folder, or Hub repo id) that `path` names; a checkpoint directory resolves to
    its latest export."""
    from engine.checkpoint import ema_export_path
    from .hub_layout import is_hub_folder, is_hub_reference  # huggingface_hub: the train extra

    if is_hub_folder(path):
        return os.path.abspath(path)
    if is_hub_reference(path):
        return path
    return os.path.abspath(ema_export_path(path))


def load_pretrained(path: str, config_raw: dict | None = None) -> tuple[dict, dict, dict, str]:
    """(raw experiment config dict, state dict in our names, the model keys the checkpoint fixes,
    description) for `path`: our EMA export or
    checkpoint directory, a Hugging Face Hub folder, or a REPA/REG/SiT `.pt` / `.safetensors` file.

    A file without our config needs `config_raw` (a YAML's mapping: its latent, transport and sample
    sections are used); its model section is replaced by what the checkpoint's tensors and options fix
    (logged)."""
    from .hub_layout import is_hub_reference, load_hub  # huggingface_hub: the train extra

    file = resolve_weights(path)
    if is_hub_reference(file):
        raw, state = load_hub(file)
        fixed = model_config_from_state_dict(state, base=raw.get("model"))
        fixed["encoder_depth"] = raw["model"]["encoder_depth"]
        return raw, state, fixed, f"Hugging Face Hub folder {file}"
    read = read_checkpoint(file)
    if read["config"]:
        raw = read["config"]
        fixed = model_config_from_state_dict(read["state"], base=raw.get("model"))
        if (raw.get("model") or {}).get("encoder_depth") is not None:
            fixed["encoder_depth"] = raw["model"]["encoder_depth"]
        return raw, read["state"], fixed, f"AlignFlow export {file}"
    if config_raw is None:
        raise ValueError(f"{file} is a {read['format']} checkpoint without an AlignFlow config; pass --config "
                         "with a YAML whose latent, transport and sample sections fit it (e.g. "
                         "configs/sit_xl2_repa_256.yaml; the model section is read from the checkpoint)")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config_raw.items()}
    model = model_config_from_state_dict(read["state"], read["args"], raw.get("model"))
    raw["model"] = {**(raw.get("model") or {}), **model}
    if not model["z_dims"]:
        raw["encoders"] = []
    transport = transport_from_args(read["args"], model["learn_sigma"])
    raw["transport"] = {**(raw.get("transport") or {}), **transport}
    kind = "REPA/REG" if read["format"] == "repa" else "state-dict"
    log.info("%s checkpoint %s: model %s; transport %s", kind, file, model, transport or "as configured")
    return raw, read["state"], model, f"{kind} checkpoint {file}"


# REPA's train.py options and the config keys that do their job here (the README's table is checked
# against this mapping; None: no counterpart, with the reason in the README).
REPA_FLAGS = {
    "--output-dir": "train.output_dir", "--exp-name": "train.output_dir", "--report-to": "logging.wandb",
    "--sampling-steps": "logging.sample_every", "--resume-step": "checkpoint.resume", "--model": "model.name",
    "--num-classes": "model.num_classes", "--encoder-depth": "model.encoder_depth",
    "--fused-attn": "train.kernels_backend", "--qk-norm": "model.qk_norm", "--data-dir": "data.root",
    "--resolution": "data.resolution", "--batch-size": "train.global_batch_size", "--allow-tf32": "train.allow_tf32",
    "--mixed-precision": "train.precision", "--epochs": None, "--max-train-steps": "train.max_steps",
    "--checkpointing-steps": "checkpoint.every", "--gradient-accumulation-steps": "train.grad_accum_steps",
    "--learning-rate": "optim.lr", "--adam-beta1": "optim.betas", "--adam-beta2": "optim.betas",
    "--adam-weight-decay": "optim.weight_decay", "--adam-epsilon": "optim.eps", "--max-grad-norm": "optim.grad_clip",
    "--seed": "train.seed", "--num-workers": "data.num_workers", "--path-type": "transport.path",
    "--prediction": "transport.prediction", "--cfg-prob": "model.class_dropout_prob", "--enc-type": "encoders",
    "--proj-coeff": "transport.proj_coeff", "--weighting": "transport.time_sampling", "--legacy": None,
}
