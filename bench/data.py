"""Data-loading benchmark: the same JPEG files through the PIL DataLoader, DALI's CPU decoder and, with
a GPU, DALI's nvJPEG decoder (`mixed`), as the trainer builds them.

    python -m bench.data [--resolution 256] [--source-size 512] [--batch 32] [--batches 50] [--smoke]

Each loader gets every core of the machine (DataLoader workers, DALI threads). Reported: images/s over
`--batches` batches after the warm-up and the batches decoded ahead during it, and CPU cores busy = CPU seconds of this process and its
live worker processes / wall seconds. The files are the built-in procedural set (10 classes) written
as square JPEGs of `--source-size` pixels, larger than the crop, so that every loader resizes and
crops as it must on ImageNet. Writes bench/results/data-<device>-<date>.json and prints its table
(`python -m bench.report` writes the table beside the JSON); `bench.train_step` runs the same
measurement as its data section.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from bench.common import environment, synchronize, write_results


def _cpu_seconds() -> float:
    """CPU seconds of this process and its live children (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:  # a worker that ended mid-measurement
            pass
    return total


def loader_rows(resolution: int, batch: int, batches: int, images_per_class: int, device,
                source_size: int | None = None) -> list[dict]:
    """One row per loader: img/s and CPU cores busy, or why it was skipped."""
    from engine.data import DataConfig, build_loader
    from engine.data.builtin import make_builtin_dataset

    source_size = source_size or 2 * resolution
    root = os.path.join(tempfile.gettempdir(), f"alignflow-bench-{source_size}-{images_per_class}")
    make_builtin_dataset(root, num_classes=10, images_per_class=images_per_class, resolution=source_size, seed=0)
    cores = os.cpu_count() or 1
    rows = []
    variants = [("pil", "auto"), ("dali", "cpu")] + ([("dali", "mixed")] if device.type == "cuda" else [])
    for decoder, dali_device in variants:
        label = decoder if decoder == "pil" else f"dali-{dali_device}"
        try:
            cfg = DataConfig(source="folder", root=root, resolution=resolution, num_classes=10, batch_size=batch,
                             decoder=decoder, dali_device=dali_device, num_threads=cores, num_workers=cores)
            loader = build_loader(cfg, rank=0, world_size=1, device=device)
            iterator = iter(loader)
            # Warm-up (pipeline build, worker start), then drain what the loader decoded ahead meanwhile
            # (DataLoader: 2 batches per worker; DALI: its prefetch queue), so the timed batches are
            # decoded while they are timed.
            drain = 1 + (cfg.prefetch if decoder == "dali" else 2 * cfg.num_workers)
            if len(loader) < drain + 2:
                raise ValueError(f"{len(loader)} batches cannot cover {drain} warm-up batches; use more images")
            for _ in range(drain):
                next(iterator)
            steps = min(len(loader) - drain, batches)
            cpu0, wall0, count = _cpu_seconds(), time.perf_counter(), 0
            for _ in range(steps):
                count += next(iterator)["image"].shape[0]
            synchronize()
            wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
            rows.append({"loader": label, "images": count, "img_per_s": count / wall if wall else 0.0,
                         "cpu_cores_busy": cpu / wall if wall else 0.0, "cores": cores})
            del iterator, loader
        except Exception as error:  # DALI missing or no GPU decoder: reported, not fatal
            rows.append({"loader": label, "skipped": f"{type(error).__name__}: {str(error)[:200]}"})
    return rows


def markdown(payload) -> str:
    env = payload["environment"]
    lines = [f"{payload['source_size']} px JPEGs decoded, resized, cropped to {payload['resolution']} px and flipped, "
             f"batch {payload['batch']}, on {env['device']} "
             f"with {env['cpu_cores']} CPU cores (torch {env['torch']}, {env['date']}).", ""]
    return "\n".join(lines + loader_table(payload["data"])) + "\n"


def loader_table(rows: list[dict]) -> list[str]:
    lines = ["| loader | img/s | CPU cores busy |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loader']} | skipped: {r['skipped']} | |" if "skipped" in r else
                     f"| {r['loader']} | {r['img_per_s']:.0f} | {r['cpu_cores_busy']:.1f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--source-size", type=int, default=512, help="side of the JPEG files")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--images-per-class", type=int, default=400)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI; the numbers mean nothing")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.resolution, args.source_size, args.batch, args.batches, args.images_per_class = 32, 64, 4, 2, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = loader_rows(args.resolution, args.batch, args.batches, args.images_per_class, device, args.source_size)
    payload = {"environment": environment(), "resolution": args.resolution, "source_size": args.source_size,
               "batch": args.batch, "data": rows}
    if args.smoke:
        print(markdown(payload))
        return 1 if any("skipped" in r and r["loader"] != "dali-mixed" for r in rows) else 0
    write_results("data", payload, args.out, lambda: markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
