"""The training data loader: a deterministic plan of batches per epoch, decoded by DALI or PIL.

Plan of epoch e (identical on every rank): perm = permutation(seed, e) of the N checked samples; the
first steps*W*B samples are used (the remainder is dropped), and step s of rank r is
perm[(s*W + r)*B : (s*W + r + 1)*B], so ranks hold disjoint equal-length shards and the global batch of
step s is the same for any world size W at a fixed global batch W*B. Flips come from the same seed.
The position (epoch, step) is therefore all that a resumed run needs to see the same batches.
"""
from __future__ import annotations

import logging
from typing import Iterator, Optional

import numpy as np
import torch

from .config import DataConfig
from .dali import DaliBackend, dali_available
from .index import SampleIndex, index_folder, index_webdataset, refuse_corrupt
from .pil import PilBackend

log = logging.getLogger("engine.data")


class Loader:
    """Iterable over the remaining batches of the current epoch; at its end the epoch advances.

    Each batch: {"image": uint8 (B,3,R,R) on `device`, "label": int64 (B,) on `device`, and with latent
    shards "latent_mean", "latent_std": fp32 (B,C,h,w) on `device` and "latent_raw" (True: the moments
    are the latent space's raw posterior, latent.scale / latent.shift still to apply; False: pre-scaled
    shards of the earlier format); "keys": the samples' keys}. `len()` is the steps per epoch.
    `skipped` counts the distinct corrupt or missing files left out or replaced so far; each is
    warned once, by name. A sample whose latent row (mean or std) holds NaN/inf is dropped from its
    batch (which is then smaller by one) each time it is drawn, and `dropped_nonfinite` counts the
    distinct keys so dropped, each warned once with its shard row; with on_corrupt="error" it is an
    error naming every such sample of the batch.
    """

    def __init__(self, cfg: DataConfig, index: SampleIndex, rank: int, world_size: int, device: torch.device,
                 backend, latents=None, latent_rows: Optional[np.ndarray] = None):
        self.cfg, self.index, self.rank, self.world_size = cfg, index, rank, world_size
        self.device, self.backend = device, backend
        self.latents, self.latent_rows = latents, latent_rows
        self.classes = index.classes
        self.num_classes = cfg.num_classes or len(index.classes)
        self.batch_size = cfg.batch_size
        self.steps_per_epoch = len(index) // (world_size * cfg.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.batch_size={cfg.batch_size} x world size {world_size} is larger than the "
                             f"{len(index)} readable samples of {cfg.root!r}; allowed: at most "
                             f"{len(index) // world_size} per rank")
        self.epoch, self.step = 0, 0
        self._warned: set[str] = set()
        self._nonfinite: set[str] = set()
        for path, reason in index.skipped:
            self._skip(path, reason)

    # ---- position ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def skipped(self) -> int:
        return len(self._warned)

    @property
    def dropped_nonfinite(self) -> int:
        return len(self._nonfinite)

    def _drop_nonfinite(self, out: dict, rows: np.ndarray) -> dict:
        """`out` without the samples whose latent rows are not finite (see the class docstring)."""
        finite = (torch.isfinite(out["latent_mean"]).flatten(1).all(1)
                  & torch.isfinite(out["latent_std"]).flatten(1).all(1))
        if bool(finite.all()):
            return out
        bad = (~finite).nonzero().flatten().tolist()
        found = [(f"{out['keys'][i]} ({self.latents.describe(rows[i])})", "non-finite latent mean or std")
                 for i in bad]
        if self.cfg.on_corrupt == "error":
            refuse_corrupt(found, "latent")
        for i, (where, reason) in zip(bad, found):
            if out["keys"][i] not in self._nonfinite:
                self._nonfinite.add(out["keys"][i])
                log.warning("dropping sample %s: %s; left out of every batch that draws it (%d such samples so far)",
                            where, reason, len(self._nonfinite))
        keep = finite.nonzero().flatten()
        return dict(out, image=out["image"][keep], label=out["label"][keep], latent_mean=out["latent_mean"][keep],
                    latent_std=out["latent_std"][keep], keys=[out["keys"][i] for i in keep.tolist()])

    def _skip(self, path: str, reason: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            log.warning("skipping corrupt or missing image %s: %s", path, reason)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; the current epoch keeps its position (so a resumed run may call
        set_epoch(resumed epoch) and continue mid-epoch)."""
        if epoch != self.epoch:
            self.epoch, self.step = int(epoch), 0

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, step=self.step, num_samples=len(self.index),
                    global_batch=self.batch_size * self.world_size, seed=self.cfg.seed)

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_samples", len(self.index)), ("global_batch", self.batch_size * self.world_size),
                          ("seed", self.cfg.seed)):
            if key in state and state[key] != mine:
                raise ValueError(f"data position saved with {key}={state[key]} cannot resume a loader with "
                                 f"{key}={mine}: the batches would differ")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    # ---- plan -------------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, flips), each (steps_per_epoch, B), of this rank for `epoch`."""
        n, steps, world, batch = len(self.index), self.steps_per_epoch, self.world_size, self.batch_size
        if self.cfg.shuffle:
            order = np.random.default_rng([self.cfg.seed, epoch, 0]).permutation(n)
        else:
            order = np.arange(n)
        order = order[:steps * world * batch].reshape(steps, world, batch)
        if self.cfg.random_flip:
            flips = np.random.default_rng([self.cfg.seed, epoch, 1]).random((steps, world, batch)) < 0.5
        else:
            flips = np.zeros((steps, world, batch), bool)
        return order[:, self.rank], flips[:, self.rank]

    # ---- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        indices, flips = self.plan(self.epoch)
        start = self.step
        for batch in self.backend.iterate(indices[start:], flips[start:]):
            for path, reason in batch["failed"]:
                self._skip(path, reason)
            out = dict(image=batch["image"].to(self.device, non_blocking=True),
                       label=batch["label"].to(self.device, non_blocking=True),
                       keys=[self.index.keys[int(i)] for i in batch["indices"]])
            if self.latents is not None:
                rows = self.latent_rows[batch["indices"].numpy()]
                out["latent_mean"], out["latent_std"] = self.latents.read(rows, flips[self.step])
                out = self._drop_nonfinite(out, rows)  # checked on the CPU, before the copy to the device
                out["latent_mean"] = out["latent_mean"].to(self.device, non_blocking=True)
                out["latent_std"] = out["latent_std"].to(self.device, non_blocking=True)
                out["latent_raw"] = self.latents.raw  # True: latent.scale / latent.shift still to apply
            self.step += 1  # counted before the yield: a checkpoint taken after this batch resumes after it
            if len(out["keys"]) == 0:
                continue  # every sample of this batch dropped: the next batch stands in for it
            yield out
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0


def _choose_decoder(cfg: DataConfig, device: torch.device) -> str:
    """"auto" is DALI's nvJPEG decoder where there is a GPU, and PIL on the CPU: on a 2-core machine
    the PIL DataLoader decoded 755 img/s against DALI's CPU pipeline's 457 (bench.data, 512 px JPEGs to
    256 px crops, bench/results/data-cpu-2026-11-24.json)."""
    if cfg.decoder == "pil":
        return "pil"
    ok, reason = dali_available()
    if cfg.decoder == "dali" and not ok:
        raise RuntimeError(f"data.decoder='dali' but {reason}; install nvidia-dali-cuda130 (pip install "
                           f"alignflow[data]) or set data.decoder to 'pil' or 'auto'")
    if cfg.decoder == "auto" and (device.type != "cuda" or cfg.dali_device == "cpu"):
        log.info("data.decoder='auto': PIL DataLoader (DALI is chosen for its GPU decoder, and this loader "
                 "decodes on the CPU)")
        return "pil"
    if not ok:
        log.warning("data.decoder='auto': using the PIL decoder because %s", reason)
        return "pil"
    return "dali"


def build_index(cfg: DataConfig) -> SampleIndex:
    """The checked sample index of `cfg` (writing the built-in set first when source='builtin')."""
    if cfg.source == "builtin":
        from .builtin import make_builtin_dataset

        make_builtin_dataset(cfg.root, num_classes=cfg.num_classes or 10,
                             images_per_class=cfg.builtin_images_per_class, resolution=cfg.builtin_image_size,
                             seed=0)
    if cfg.source == "repa":
        from .repa import index_repa

        return index_repa(cfg.root, cfg.validate, cfg.on_corrupt, cfg.cache_dir, num_threads=cfg.num_threads)[0]
    if cfg.source == "webdataset":
        index = index_webdataset(cfg.root, cfg.validate, cfg.on_corrupt, cfg.cache_dir, num_threads=cfg.num_threads)
    else:
        index = index_folder(cfg.root, cfg.validate, cfg.on_corrupt, cfg.cache_dir, num_threads=cfg.num_threads,
                             source=cfg.source)
    if cfg.num_classes is not None and cfg.num_classes < len(index.classes):
        raise ValueError(f"data.num_classes={cfg.num_classes} but {cfg.root!r} has {len(index.classes)} classes; "
                         f"allowed: null or >= {len(index.classes)}")
    return index


def _distributed_barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def build_loader(cfg: DataConfig, rank: int, world_size: int, device) -> Loader:
    """The loader of rank `rank` of `world_size`, yielding batches on `device`.

    Under torch.distributed, rank 0 builds (and caches) the index first and the others follow, so the
    files are checked once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    device = torch.device(device)
    def indexed():
        if cfg.source == "repa":  # its latents are indexed (and checked) with its images
            from .repa import index_repa

            return index_repa(cfg.root, cfg.validate, cfg.on_corrupt, cfg.cache_dir, num_threads=cfg.num_threads)
        return build_index(cfg), None, None

    if rank == 0:
        index, latents, latent_rows = indexed()
        _distributed_barrier()
    else:
        _distributed_barrier()
        index, latents, latent_rows = indexed()

    if cfg.latents_root is not None:
        from .latent_shards import LatentShards

        latents = LatentShards(cfg.latents_root)
        if latents.meta.get("resolution", cfg.resolution) != cfg.resolution:
            raise ValueError(f"data.resolution={cfg.resolution} but the latents at {cfg.latents_root!r} were encoded "
                             f"at {latents.meta['resolution']}; allowed: {latents.meta['resolution']}")
        rows = latents.rows_for(index.keys)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            skipped = [(index.paths[i], f"no latent in {cfg.latents_root}") for i in missing]
            if cfg.on_corrupt == "error":
                refuse_corrupt(skipped)
            keep = np.flatnonzero(rows >= 0)
            index = index.subset(keep)
            index.skipped.extend(skipped)
            rows = rows[keep]
        latent_rows = rows

    decoder = _choose_decoder(cfg, torch.device(device))
    if decoder == "dali":
        dali_device = cfg.dali_device
        if dali_device == "auto":
            dali_device = "mixed" if device.type == "cuda" else "cpu"
        if dali_device == "mixed" and device.type != "cuda":
            raise ValueError(f"data.dali_device='mixed' decodes on the GPU but the loader's device is {device}; "
                             "allowed here: 'cpu' or 'auto'")
        backend = DaliBackend(index, cfg.resolution, cfg.batch_size, dali_device, device, cfg.num_threads,
                              cfg.prefetch, cfg.seed + rank, cfg.on_corrupt)
    else:
        backend = PilBackend(index, cfg.resolution, cfg.on_corrupt, cfg.num_workers,
                             pin_memory=device.type == "cuda")
    log.info("data: %d samples (%d skipped), %d classes, %d steps/epoch of %d per rank, decoder %s", len(index),
             len(index.skipped), len(index.classes), len(index) // (world_size * cfg.batch_size), cfg.batch_size,
             backend.name)
    return Loader(cfg, index, rank, world_size, device, backend, latents, latent_rows)
