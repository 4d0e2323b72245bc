"""Images from a model, the library behind the sampling command (`engine.sample`), the trainer's
grids and final samples, and evaluation: `generate` (uint8 images for labels, through the ODE/SDE
samplers of `engine.samplers` and the latent space's decoder), `batch_labels` (the labels of a
global batch), `save_grid` (a PNG), `save_npz` (the ADM / REPA evaluation layout) and
`load_for_sampling` (a model from a checkpoint).
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch

from engine.atomic_files import write_atomic
from engine.config import apply_overrides, from_dict, load_raw
from engine.configurable import ConfigError
from engine.models import build_model
from engine.models.latents import build_latent_space
from engine.models.pretrained import load_pretrained

log = logging.getLogger("engine.images")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def batch_labels(batch: int, batch_size: int, num_images: int, num_classes: int) -> torch.Tensor:
    """Labels of global batch `batch`: image i has label i % num_classes (class-balanced)."""
    start = batch * batch_size
    return torch.arange(start, min(start + batch_size, num_images)) % num_classes


@torch.no_grad()
def generate(model, latent_space, labels: torch.Tensor, cfg, device, seed: int | None = None,
             bf16: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W, 3) for `labels`, sampled in batches of cfg.sample.batch_size; with `bf16`
    the model runs under bf16 autocast (the sampler's state and the decoder stay fp32)."""
    from engine.samplers import sample

    s = cfg.sample
    seed = s.seed if seed is None else seed
    out = []
    for i, start in enumerate(range(0, len(labels), s.batch_size)):
        y = labels[start:start + s.batch_size].to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            latents = sample(model, y, num_steps=s.num_steps, method=s.method, cfg_scale=s.cfg_scale,
                             guidance_interval=(s.guidance_low, s.guidance_high), seed=seed + i,
                             transport_cfg=cfg.transport)
        out.append(to_uint8(latent_space.decode(latents.float())))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, pad: int = 2, min_size: int = 64) -> str:
    """uint8 (N, H, W, 3) -> one PNG grid; images smaller than `min_size` are enlarged (nearest) for
    viewing."""
    from PIL import Image

    factor = max(1, min_size // max(1, images.shape[1]))
    if factor > 1:
        images = images.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    n, h, w, _ = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images.numpy()):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def save_npz(images: torch.Tensor, labels: torch.Tensor, path: str) -> str:
    return write_atomic(path, lambda f: np.savez(f, arr_0=images.numpy(), labels=labels.cpu().numpy()))


def guard_imports(raw: dict, overrides, source: str, user_raw: dict | None = None) -> None:
    """A config read from a checkpoint may not name a module to import (latent.kind: module) unless the
    user names it too (the --config YAML or an override): a checkpoint from elsewhere must not pick code
    to run."""
    latent = raw.get("latent") or {}
    if latent.get("kind") == "module":
        mine = {item.split("=", 1)[0].strip(): item.split("=", 1)[1].strip() for item in overrides if "=" in item}
        yours = ((user_raw or {}).get("latent") or {}).get("path")
        if latent.get("path") not in (mine.get("latent.path"), yours):
            raise ConfigError("latent.path", latent.get("path"),
                              f"a module you name yourself: the config in {source} asks to import it; pass "
                              f"--latent-module {latent.get('path')} to allow it")


def load_for_sampling(path: str, device, overrides: list[str] = (), config: str | None = None):
    """(config, fp32 EMA model, latent space) from an EMA export, a checkpoint directory, or a REPA / REG /
    SiT checkpoint (engine.models.pretrained) with `config`, a YAML for what the checkpoint lacks."""
    user_raw = load_raw(config) if config else None
    raw, state, _, source = load_pretrained(path, user_raw)
    raw = apply_overrides(raw, list(overrides))
    guard_imports(raw, overrides, source, user_raw)
    cfg = from_dict(raw)
    model = build_model(cfg.model)
    model.load_state_dict(state, strict=True)
    log.info("sampling %s", source)
    return cfg, model.to(device).eval(), build_latent_space(cfg.latent, device=device)
