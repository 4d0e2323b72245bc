"""The sampling command: images from a trained model, a PNG grid and an `.npz` of uint8 samples for
FID evaluation, spread over any number of processes and resumable. (The library it runs, which the
trainer uses too, is `engine.images`; the ODE/SDE samplers are `engine.samplers`.)

    python -m engine.sample --ckpt runs/builtin_cpu/checkpoints --out runs/builtin_cpu/eval \\
        [--num-images 1000] [--num-steps 50] [--method euler|heun|euler_maruyama] [--cfg-scale 1.0]
        [--guidance-low 0.0] [--guidance-high 1.0]
    deepspeed --num_gpus 8 --module engine.sample --ckpt CKPT --out OUT --num-images 50000   # FID-50K
    torchrun --nproc_per_node 8 -m engine.sample --ckpt CKPT --out OUT --num-images 50000

`--ckpt` is an `ema_fp32.pt` export, a `step_*` checkpoint directory or a checkpoint directory (its
latest, resolved once at the start), or a REPA / REG / SiT checkpoint with `--config YAML` for the
latent space, transport and sampling settings it does not carry (engine.models.pretrained). Image i has label i % num_classes; global batch b (of
sample.batch_size images) is sampled with seed sample.seed + b, so the images do not depend on the
number of processes. Each finished batch is written atomically to `OUT/parts/batch_<b>.npz`
(`engine.parts`); a rerun of the same command skips the parts that load and regenerates missing or
corrupt ones (the settings in `OUT/parts/meta.json` must match, else a one-line error names those
that differ; `--overwrite` starts afresh). At the end rank 0 writes
`OUT/samples.npz` (`arr_0` (N, H, W, 3) uint8, the layout of the ADM / REPA evaluation suite, and
`labels`) and `OUT/samples.png`, then deletes the parts unless `--keep-parts`. OUT must be shared
by all processes.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from engine.atomic_files import write_atomic
from engine.distributed import DistInfo, command_process, run_on_main
from engine.images import batch_labels, generate, load_for_sampling, save_grid
from engine.parts import open_parts, part_path, parts_to_make, read_parts, write_part

log = logging.getLogger("engine.sample")

PARTS_DIR = "parts"
SAMPLING_TIMEOUT_S = 2 * 3600
# Parts written before a setting existed were made with its default.
META_DEFAULTS = {"guidance_low": 0.0, "guidance_high": 1.0}
PRECISIONS = ("fp32", "tf32", "bf16")


# ----------------------------------------------------------------------------------------------
# Parts: one npz per global batch
# ----------------------------------------------------------------------------------------------

def check_images(part, labels: torch.Tensor, resolution: int) -> str | None:
    """None when the part holds the batch for `labels`; otherwise what is wrong."""
    images, part_labels = part["images"], part["labels"]
    expected = (len(labels), resolution, resolution, 3)
    if images.dtype != np.uint8 or images.shape != expected:
        return f"holds {images.dtype} images of shape {images.shape}, expected uint8 {expected}"
    if not np.array_equal(part_labels, labels.numpy()):
        return "holds other labels"
    return None


def write_samples_npz(parts_dir: str, num_batches: int, meta: dict, path: str, keep: int) -> np.ndarray:
    """Stream the parts, in order, into `path` (`arr_0` (N, H, W, 3) uint8 and `labels`, what np.savez
    writes) holding one part in memory at a time; returns the first `keep` images (for the grid)."""
    n, res = meta["num_images"], meta["resolution"]
    labels = np.empty(n, dtype=np.int64)
    first = []

    def write(f):
        # np.savez's layout: an uncompressed zip of .npy files (zip64: FID-50K at 512 px is 39 GB).
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_1_0(
                    entry, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                            "shape": (n, res, res, 3)})
                start = 0
                for batch, part in enumerate(read_parts(parts_dir, num_batches, ("images", "labels"))):
                    images, part_labels = part["images"], part["labels"]
                    stop = start + len(images)
                    if images.dtype != np.uint8 or images.shape[1:] != (res, res, 3) or stop > n:
                        raise ValueError(f"{part_path(parts_dir, batch)}: unexpected {images.dtype} {images.shape}")
                    entry.write(np.ascontiguousarray(images).data)
                    labels[start:stop] = part_labels
                    if sum(len(x) for x in first) < keep:
                        first.append(images[: keep - sum(len(x) for x in first)].copy())
                    start = stop
                if start != n:
                    raise ValueError(f"the parts in {parts_dir} hold {start} images, expected {n}")
            with zf.open("labels.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, labels)

    write_atomic(path, write)
    return np.concatenate(first) if first else np.zeros((0, res, res, 3), np.uint8)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    from engine.samplers import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="ema_fp32.pt, a step_* directory or a checkpoint directory; "
                        "a Hugging Face Hub folder or repo id (config.json + model.safetensors), or a REPA / REG / SiT .pt "
                        "(or .safetensors) with --config")
    parser.add_argument("--config", default=None, help="YAML for a checkpoint that carries no AlignFlow config "
                        "(REPA/REG/SiT): its latent, transport and sample sections; the model comes from the "
                        "checkpoint")
    parser.add_argument("--out", required=True, help="output directory (shared by all processes)")
    parser.add_argument("--num-images", type=int, default=None, help="default: the checkpoint's sample.num_images")
    parser.add_argument("--num-steps", type=int, default=None)
    parser.add_argument("--method", default=None, choices=METHODS)
    parser.add_argument("--cfg-scale", type=float, default=None)
    # REPA's generate.py spells them --guidance_low / --guidance_high, its README --guidance-high: both work
    parser.add_argument("--guidance-low", "--guidance_low", dest="guidance_low", type=float, default=None,
                        metavar="T", help="guide only where t >= T (t = 0 data, t = 1 noise, REPA's direction and "
                        "flag; default: the config's sample.guidance_low, 0)")
    parser.add_argument("--guidance-high", "--guidance_high", dest="guidance_high", type=float, default=None,
                        metavar="T", help="guide only where t <= T (REPA's --guidance-high; default: "
                        "sample.guidance_high, 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per global batch (one seed each)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (each rank takes cuda:LOCAL_RANK), cuda:N or cpu")
    parser.add_argument("--kernels-backend", default=None, help="torch / triton (default: triton on CUDA)")
    parser.add_argument("--precision", default="tf32", choices=PRECISIONS,
                        help="the model's matmuls: fp32, TF32 (the default, as DiT's and REPA's samplers) or "
                             "bf16 autocast; the ODE/SDE state stays fp32")
    parser.add_argument("--latent-module", default=None, metavar="PKG.MODULE:FACTORY",
                        help="allow the latent.kind: module space the checkpoint's config names (it is imported "
                             "only when you name it here)")
    parser.add_argument("--overwrite", action="store_true", help="delete parts left by an earlier run first")
    parser.add_argument("--keep-parts", action="store_true", help="keep OUT/parts after samples.npz is written")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK wins
    args = parser.parse_args(argv)
    for key in ("num_images", "num_steps", "batch_size"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    for key in ("guidance_low", "guidance_high"):
        value = getattr(args, key)
        if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
            parser.error(f"--{key.replace('_', '-')} must be in [0, 1] (t = 0 data, t = 1 noise), got {value}")
    if args.guidance_low is not None and args.guidance_high is not None and args.guidance_low > args.guidance_high:
        parser.error(f"--guidance-low {args.guidance_low} must be <= --guidance-high {args.guidance_high}")
    from engine.models.hub_layout import is_hub_reference  # huggingface_hub: the train extra

    if not os.path.exists(args.ckpt) and not is_hub_reference(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt} does not exist (nor is it a Hub repo id user/name)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; it must be a directory (created if missing)")
    return args


def main(argv=None) -> dict:
    """Sample, resumably, on every rank; rank 0 returns {"grid", "npz", "num_batches", "skipped",
    "generated", "corrupt"} (batch counts over all ranks), other ranks {}."""
    args = parse_args(argv)
    # Ranks wait at the final barrier for the slowest one's last batch: allow long batches.
    with command_process(args.device, local_rank=args.local_rank, timeout_s=SAMPLING_TIMEOUT_S) as info:
        return _sample(args, info)


def _sample(args: argparse.Namespace, info: DistInfo) -> dict:
    import kernels
    from engine.models.pretrained import resolve_weights

    kernels.set_backend(args.kernels_backend or ("triton" if info.device.type == "cuda" else "torch"))
    overrides = [f"sample.{key}={value}" for key, value in (
        ("num_images", args.num_images), ("num_steps", args.num_steps), ("method", args.method),
        ("cfg_scale", args.cfg_scale), ("batch_size", args.batch_size), ("seed", args.seed),
        ("guidance_low", args.guidance_low), ("guidance_high", args.guidance_high)) if value is not None]
    if args.latent_module:
        overrides.append(f"latent.path={args.latent_module}")
    # Rank 0 resolves "latest" once, so that every rank (and a restart) samples the same weights.
    ckpt = run_on_main(info, lambda: resolve_weights(args.ckpt))
    cfg, model, latent_space = load_for_sampling(ckpt, info.device, overrides, args.config)
    s = cfg.sample
    if s.num_images < 1:
        raise ValueError(f"sample.num_images={s.num_images} in {ckpt}: nothing to sample; pass --num-images N")
    if s.batch_size < 1 or s.num_steps < 1:
        raise ValueError(f"sample.batch_size={s.batch_size}, sample.num_steps={s.num_steps} in {ckpt}; need >= 1")
    resolution = cfg.model.input_size * latent_space.downsample
    # The settings that change the images: a restart must match them all to reuse the parts.
    meta = dict(ckpt=ckpt, config=args.config and os.path.abspath(args.config), num_images=s.num_images, batch_size=s.batch_size, seed=s.seed, num_steps=s.num_steps,
                method=s.method, cfg_scale=s.cfg_scale, resolution=resolution, precision=args.precision,
                guidance_low=s.guidance_low, guidance_high=s.guidance_high)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"

    parts_dir = os.path.join(args.out, PARTS_DIR)
    run_on_main(info, lambda: open_parts(parts_dir, meta, stale="refuse", overwrite=args.overwrite,
                                         defaults=META_DEFAULTS))

    num_batches = math.ceil(s.num_images / s.batch_size)
    labels_of = lambda b: batch_labels(b, s.batch_size, s.num_images, cfg.model.num_classes)  # noqa: E731
    parts = parts_to_make(info, parts_dir, num_batches,
                          lambda part, batch: check_images(part, labels_of(batch), resolution))
    missing, corrupt, todo = parts.missing, parts.corrupt, parts.mine
    remaining = sum(len(labels_of(b)) for b in missing)
    already = s.num_images - remaining
    if info.is_main:
        log.info("%d images in %d batches of %d over %d rank(s): %d batches (%d images) already done, skipped; "
                 "%d to generate (%d of them corrupt); %s %d steps, cfg %g for t in [%g, %g], seed %d", s.num_images,
                 num_batches, s.batch_size, info.world_size, num_batches - len(missing), already, len(missing),
                 len(corrupt), s.method, s.num_steps, s.cfg_scale, s.guidance_low, s.guidance_high, s.seed)

    start_time, generated = time.time(), 0
    for i, batch in enumerate(todo):
        labels = labels_of(batch)
        images = generate(model, latent_space, labels, cfg, info.device, seed=s.seed + batch,
                          bf16=args.precision == "bf16")
        if tuple(images.shape[1:]) != (resolution, resolution, 3):
            raise RuntimeError(f"the model made images of shape {tuple(images.shape[1:])}, expected "
                               f"{(resolution, resolution, 3)}")
        write_part(parts_dir, batch, images=images.numpy(), labels=labels.numpy())
        generated += len(labels)
        if info.is_main:
            rate = generated / max(time.time() - start_time, 1e-9)
            done = min(s.num_images, already + generated * info.world_size)  # other ranks keep pace
            eta = (s.num_images - done) / max(rate * info.world_size, 1e-9)
            log.info("batch %d (%d/%d on this rank): ~%d/%d images, %.2f img/s per rank (~%.1f img/s in all), "
                     "ETA %dh%02dm", batch, i + 1, len(todo), done, s.num_images, rate, rate * info.world_size,
                     eta // 3600, eta % 3600 // 60)
    if info.world_size > 1:
        dist.barrier(device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if not info.is_main:
        return {}

    npz = os.path.join(args.out, "samples.npz")
    first = write_samples_npz(parts_dir, num_batches, meta, npz, keep=min(s.grid_images, s.num_images))
    grid = save_grid(torch.from_numpy(first), os.path.join(args.out, "samples.png"),
                     nrow=min(len(first), cfg.model.num_classes))
    if not args.keep_parts:
        shutil.rmtree(parts_dir)
    log.info("wrote %s and %s (%d images, %s %d steps, cfg %g)", grid, npz, s.num_images, s.method, s.num_steps,
             s.cfg_scale)
    return {"grid": grid, "npz": npz, "num_batches": num_batches, "skipped": num_batches - len(missing),
            "generated": len(missing), "corrupt": len(corrupt)}


if __name__ == "__main__":
    main()
