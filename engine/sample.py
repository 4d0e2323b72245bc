"""Images from a trained model: a PNG grid and an `.npz` of uint8 samples for FID evaluation.

    python -m engine.sample --ckpt runs/builtin_cpu/checkpoints --out runs/builtin_cpu/eval \\
        [--num-images 1000] [--num-steps 50] [--method euler|heun|euler_maruyama] [--cfg-scale 1.0]

`--ckpt` is an `ema_fp32.pt` export, a `step_*` checkpoint directory or a checkpoint directory (its
latest). The npz holds `arr_0` (N, H, W, 3) uint8, the layout of the ADM / REPA evaluation suite, and
`labels`.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def generate(model, latent_space, labels: torch.Tensor, cfg, device, seed: int | None = None) -> torch.Tensor:
    """uint8 images (N, H, W, 3) for `labels`, sampled in batches of cfg.sample.batch_size."""
    from engine.sampling import sample

    s = cfg.sample
    seed = s.seed if seed is None else seed
    out = []
    for i, start in enumerate(range(0, len(labels), s.batch_size)):
        y = labels[start:start + s.batch_size].to(device)
        latents = sample(model, y, num_steps=s.num_steps, method=s.method, cfg_scale=s.cfg_scale, seed=seed + i,
                         transport_cfg=cfg.transport)
        out.append(to_uint8(latent_space.decode(latents)))
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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez(path, arr_0=images.numpy(), labels=labels.cpu().numpy())
    return path


def load_for_sampling(path: str, device, overrides: list[str] = ()):
    """(config, fp32 EMA model, latent space) from an EMA export or checkpoint directory."""
    from engine.checkpoint import load_ema_export
    from engine.config import apply_overrides, from_dict
    from engine.models import build_model
    from engine.models.latents import build_latent_space

    state, raw = load_ema_export(path)
    if not raw:
        raise ValueError(f"{path} carries no config; it was not written by engine.train")
    cfg = from_dict(apply_overrides(raw, list(overrides)))
    model = build_model(cfg.model)
    model.load_state_dict(state, strict=True)
    return cfg, model.to(device).eval(), build_latent_space(cfg.latent, device=device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--num-steps", type=int, default=None)
    parser.add_argument("--method", default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernels-backend", default=None, help="torch / triton (default: triton on CUDA)")
    args = parser.parse_args(argv)

    import kernels
    kernels.set_backend(args.kernels_backend or ("triton" if args.device.startswith("cuda") else "torch"))
    overrides = [f"sample.{key}={value}" for key, value in (
        ("num_images", args.num_images), ("num_steps", args.num_steps), ("method", args.method),
        ("cfg_scale", args.cfg_scale), ("batch_size", args.batch_size), ("seed", args.seed)) if value is not None]
    device = torch.device(args.device)
    cfg, model, latent_space = load_for_sampling(args.ckpt, device, overrides)
    labels = torch.arange(cfg.sample.num_images) % cfg.model.num_classes
    images = generate(model, latent_space, labels, cfg, device)
    grid = save_grid(images[: cfg.sample.grid_images], os.path.join(args.out, "samples.png"),
                     nrow=min(len(images), cfg.model.num_classes))
    npz = save_npz(images, labels, os.path.join(args.out, "samples.npz"))
    print(f"wrote {grid} and {npz} ({len(images)} images, {cfg.sample.method} {cfg.sample.num_steps} steps, "
          f"cfg {cfg.sample.cfg_scale})")
    return {"grid": grid, "npz": npz}


if __name__ == "__main__":
    main()
