"""Encode a data set into pre-extracted latent shards (engine.data.latent_shards).

    python -m engine.preprocess --data-root data/imagenet/train --out latents/sdvae-256 \
        --latent-space sd-vae-ft-ema --resolution 256
    deepspeed --num_gpus 8 -m engine.preprocess ...     (or torchrun): chunks are split across ranks

Images are decoded with the exact ADM centre crop (PIL path) and encoded in batches; every chunk of
rows is marked done once written, so a rerun with the same arguments skips the finished chunks.
The shards hold the latent space's raw posterior moments (meta.json "moments": "raw"): latent.scale and
latent.shift are applied when the trainer reads them, so a change of either needs no new shards, and
the per-channel statistics of the raw latents go to stats.json beside the shards at the end of the same
run (with the scale and shift that would normalise them to zero mean and unit std, also logged).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch

from engine.data.config import DataConfig
from engine.data.index import CorruptImageError
from engine.data.latent_shards import RAW, LatentShardWriter
from engine.data.loader import build_index
from engine.data.transforms import decode_pil

log = logging.getLogger("engine.preprocess")

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def latent_config(spec: str, scale: str | None = None, shift: str | None = None):
    """A LatentConfig from the command line: "identity" (pixel space), a local diffusers AutoencoderKL
    folder / cached hub id, or "module:package.module:factory"; scale and shift as one number or
    comma-separated per channel (they do not change the shards, which hold raw moments)."""
    from engine.models.latents import LatentConfig

    def number_or_list(text):
        if text == "auto":
            return text
        values = [float(v) for v in text.split(",")]
        return values[0] if len(values) == 1 else values

    if spec == "identity":
        values = {"kind": "identity"}
    elif spec.startswith("module:"):
        values = {"kind": "module", "path": spec[len("module:"):]}
    else:
        values = {"kind": "vae", "path": spec}
    if scale is not None:
        values["scale"] = number_or_list(scale)
    if shift is not None:
        values["shift"] = number_or_list(shift)
    return LatentConfig(**values)


def encoder_from_latent_space(cfg, device: torch.device) -> Encoder:
    """encode(images uint8 (B,3,H,W)) -> raw (mean, std) of the latent space `cfg` (a LatentConfig),
    before its scale / shift (what the shards store)."""
    from engine.models.latents import build_latent_space  # lazy: heavy, and only needed here

    space = build_latent_space(cfg)
    if hasattr(space, "to"):
        space = space.to(device)
    if hasattr(space, "eval"):
        space.eval()
    return space.encode_raw


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _decode(index, rows: np.ndarray, res: int, pool: ThreadPoolExecutor) -> torch.Tensor:
    def one(i):
        try:
            return decode_pil(index.read(i), res)
        except Exception as error:
            raise CorruptImageError(f"cannot decode {index.paths[i]} ({index.keys[i]}): {error}") from None
    return torch.from_numpy(np.stack(list(pool.map(one, rows.tolist()))))


def preprocess(cfg: DataConfig, out: str, encode: Encoder, *, latent_space: str = "custom", batch_size: int = 64,
               chunk_size: int = 1024, dtype: str = "float16", rank: int = 0, world_size: int = 1,
               device="cpu", decode_threads: int = 4, max_chunks: Optional[int] = None) -> dict:
    """Encode every image of `cfg` into shards at `out`; returns {"written": chunks encoded now,
    "already_done": chunks of this rank found finished, "stats": the statistics (rank 0, when complete)}.
    `encode` gives the raw posterior moments (before latent.scale / latent.shift: the shards are
    written as "moments": "raw"). Chunk c is encoded by rank c % world_size. `max_chunks` stops after
    that many chunks on this rank (to bound a run; a rerun continues)."""
    device = torch.device(device)
    if rank == 0:
        index = build_index(cfg)
        _barrier(world_size)
    else:
        _barrier(world_size)
        index = build_index(cfg)
    for path, reason in index.skipped:
        log.warning("skipping corrupt or missing image %s: %s", path, reason)

    pool = ThreadPoolExecutor(max(1, decode_threads))
    with torch.no_grad():
        probe_mean, _ = encode(_decode(index, np.array([0]), cfg.resolution, pool).to(device))
    shape = tuple(probe_mean.shape[1:])
    meta = dict(latent_space=latent_space, resolution=cfg.resolution, source=cfg.source,
                data_root=os.path.abspath(cfg.root), moments=RAW)
    if rank == 0:
        writer = LatentShardWriter(out, index.keys, index.labels, shape, dtype, chunk_size, meta, create=True)
        _barrier(world_size)
    else:
        _barrier(world_size)
        writer = LatentShardWriter(out, index.keys, index.labels, shape, dtype, chunk_size, meta, create=False)

    mine = [c for c in range(writer.num_chunks) if c % world_size == rank]
    todo = [c for c in mine if not writer.is_done(c)]
    already_done = len(mine) - len(todo)
    if max_chunks is not None:
        todo = todo[:max_chunks]
    log.info("rank %d: %d of its %d chunks to encode (%d samples, latent %s %s)", rank, len(todo), len(mine),
             len(index), shape, dtype)
    start_time = time.time()
    for n, chunk in enumerate(todo):
        start, stop = writer.chunk_rows(chunk)
        means, stds = [], []
        for b in range(start, stop, batch_size):
            images = _decode(index, np.arange(b, min(stop, b + batch_size)), cfg.resolution, pool).to(device)
            with torch.no_grad():
                mean, std = encode(images)
            means.append(mean.float().cpu().numpy())
            stds.append(std.float().cpu().numpy())
        writer.write_chunk(chunk, np.concatenate(means), np.concatenate(stds))
        log.info("rank %d: chunk %d done (%d/%d, %.1f img/s)", rank, chunk, n + 1, len(todo),
                 (stop - start) * (n + 1) / max(time.time() - start_time, 1e-9))
    pool.shutdown()
    _barrier(world_size)
    stats = None
    if rank == 0 and not writer.missing_chunks():
        stats = writer.write_stats()
    _barrier(world_size)
    return dict(written=todo, already_done=already_done, stats=stats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--latent-space", required=True,
                        help='"identity" (pixel space), a local diffusers AutoencoderKL folder / cached hub id, '
                             'or "module:package.module:factory" (your own autoencoder)')
    # no longer taken: the shards hold raw moments; named here so that an old command gets a clear error
    parser.add_argument("--latent-scale", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--latent-shift", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--source", default="folder", choices=["folder", "builtin", "webdataset"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--decode-threads", type=int, default=8)
    parser.add_argument("--on-corrupt", default="skip", choices=["skip", "error"])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, value in (("--latent-scale", args.latent_scale), ("--latent-shift", args.latent_shift)):
        if value is not None:
            parser.error(f"{flag} {value}: not taken any more; the shards hold the raw posterior moments and "
                         "the trainer applies latent.scale / latent.shift (set them in the experiment config)")
    from engine.distributed import command_process

    # every rank logs its own chunks' progress
    with command_process("cuda" if torch.cuda.is_available() else "cpu", local_rank=args.local_rank,
                         worker_log_level=logging.INFO) as info:
        _preprocess(args, info)


def _preprocess(args: argparse.Namespace, info) -> None:
    cfg = DataConfig(source=args.source, root=args.data_root, resolution=args.resolution,
                     num_classes=args.num_classes, on_corrupt=args.on_corrupt, num_threads=args.decode_threads)
    encode = encoder_from_latent_space(latent_config(args.latent_space), info.device)
    result = preprocess(cfg, args.out, encode, latent_space=args.latent_space, batch_size=args.batch_size,
                        chunk_size=args.chunk_size, dtype=args.dtype, rank=info.rank, world_size=info.world_size,
                        device=info.device, decode_threads=args.decode_threads)
    if info.is_main and result["stats"] is not None:
        stats = result["stats"]
        log.info("raw latent statistics (%s): %s", os.path.join(args.out, "stats.json"), stats)
        log.info("to train on zero-mean, unit-std latents: latent.scale: %s, latent.shift: %s",
                 stats["unit_scale"], stats["unit_shift"])


if __name__ == "__main__":
    main()
