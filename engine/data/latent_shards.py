"""Pre-extracted latent shards: the posterior mean and std of every image, sampled each step.

Layout of a shard directory (a few large contiguous files, not one file per image):
  meta.json    {"num_samples", "shape": [C, h, w], "dtype", "chunk_size", "latent_space", "resolution",
               "moments", ...}
  index.json   {"keys": [...], "labels": [...]}: row i holds the image with key keys[i] (its path
               relative to the data root, or "<shard>.tar/<member>"), matched to images by key
  mean.npy     (N, C, h, w) posterior means, fp16 or fp32, read through a memory map
  std.npy      (N, C, h, w) posterior standard deviations
  done/        one empty marker per finished chunk of `chunk_size` rows (resumable writing)
  stats.json   per-channel statistics of the latents (written when every chunk is done)

"moments": "raw" (what engine.preprocess writes): mean/std are the latent space's own posterior, before
latent.scale / latent.shift, which the trainer applies on read (`LatentShards.raw`, as for REPA's
vae-sd/ latents), so one set of shards serves any scale and shift and stats.json holds the raw
statistics. Shards without "moments" (written before it existed) hold moments with the scale / shift
recorded as "latent_scale" / "latent_shift" already applied; they load as they always did (the trainer
refuses another latent.scale / latent.shift for them).

Several ranks may write one directory at once: rank 0 creates the files, each rank fills its own
chunks (disjoint row ranges of the shared memory map) and marks them done.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from engine.atomic_files import write_atomic

META, INDEX, STATS = "meta.json", "index.json", "stats.json"
DTYPES = ("float16", "float32")
RAW = "raw"  # meta.json "moments" of shards that hold the posterior before latent.scale / latent.shift


def holds_raw_moments(meta: dict, root: str) -> bool:
    """True for raw shards, False for the pre-scaled ones written before meta.json had "moments"."""
    moments = meta.get("moments")
    if moments not in (None, RAW):
        raise ValueError(f"data.latents_root={root!r}: {META} has moments={moments!r}, which this version does "
                         f"not read; allowed: {RAW!r} (or none: pre-scaled shards); rewrite them with "
                         "python -m engine.preprocess")
    return moments == RAW


def read_meta(root: str, missing_ok: bool = False) -> Optional[dict]:
    """The shards' meta.json (the one place it is read); None if there is none and `missing_ok`."""
    meta_path = os.path.join(root, META)
    if not os.path.exists(meta_path):
        if missing_ok:
            return None
        raise FileNotFoundError(f"data.latents_root={root!r} holds no latent shards ({META} missing); "
                                "write them with python -m engine.preprocess")
    with open(meta_path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj).encode()))


class LatentShardWriter:
    """Creates (or reopens, to resume) a shard directory and writes it chunk by chunk."""

    def __init__(self, out: str, keys: list[str], labels, shape: tuple[int, int, int], dtype: str = "float16",
                 chunk_size: int = 1024, meta: Optional[dict] = None, create: bool = True):
        if dtype not in DTYPES:
            raise ValueError(f"latent dtype={dtype!r} is not allowed: one of {DTYPES}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} is not allowed: an integer >= 1")
        self.out, self.chunk_size = out, chunk_size
        self.num_samples, self.shape, self.dtype = len(keys), tuple(int(s) for s in shape), dtype
        want = dict(num_samples=self.num_samples, shape=list(self.shape), dtype=dtype, chunk_size=chunk_size,
                    **(meta or {}))
        have = read_meta(out, missing_ok=True)
        if have is not None:
            if have != want:
                diff = {k: (have.get(k), want.get(k)) for k in set(have) | set(want) if have.get(k) != want.get(k)}
                raise ValueError(f"latent shards at {out!r} were started with other settings "
                                 f"(saved, requested): {diff}; use another --out or delete it")
            with open(os.path.join(out, INDEX)) as f:
                if json.load(f)["keys"] != list(keys):
                    raise ValueError(f"latent shards at {out!r} index other images than requested")
        elif create:
            os.makedirs(os.path.join(out, "done"), exist_ok=True)
            _write_json(os.path.join(out, INDEX), dict(keys=list(keys), labels=[int(x) for x in labels]))
            for name in ("mean", "std"):
                np.lib.format.open_memmap(os.path.join(out, f"{name}.npy.tmp"), mode="w+", dtype=dtype,
                                          shape=(self.num_samples, *self.shape))
                os.replace(os.path.join(out, f"{name}.npy.tmp"), os.path.join(out, f"{name}.npy"))
            _write_json(os.path.join(out, META), want)  # written last: its presence means the files exist
        else:
            raise FileNotFoundError(f"latent shards at {out!r} not created yet (rank 0 creates them)")
        os.makedirs(os.path.join(out, "done"), exist_ok=True)
        self._mean = np.load(os.path.join(out, "mean.npy"), mmap_mode="r+")
        self._std = np.load(os.path.join(out, "std.npy"), mmap_mode="r+")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_size, min(self.num_samples, (chunk + 1) * self.chunk_size)

    def _marker(self, chunk: int) -> str:
        return os.path.join(self.out, "done", f"chunk_{chunk:06d}")

    def is_done(self, chunk: int) -> bool:
        return os.path.exists(self._marker(chunk))

    def write_chunk(self, chunk: int, mean, std) -> None:
        start, stop = self.chunk_rows(chunk)
        mean, std = np.asarray(mean), np.asarray(std)
        expected = (stop - start, *self.shape)
        if mean.shape != expected or std.shape != expected:
            raise ValueError(f"chunk {chunk}: mean {mean.shape} / std {std.shape}, expected {expected}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()):
            raise ValueError(f"chunk {chunk}: non-finite latents or negative std from the encoder")
        self._mean[start:stop] = mean
        self._std[start:stop] = std
        self._mean.flush()
        self._std.flush()
        open(self._marker(chunk), "w").close()  # after the flush: a marker means the rows are on disk

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not self.is_done(c)]

    def write_stats(self, block: int = 4096) -> dict:
        """Per-channel statistics over all samples and positions, written to stats.json:
        channel_mean = E[mean]; channel_std = std of sampled latents = sqrt(Var[mean] + E[std^2]);
        posterior_mean_std = std of the means alone; unit_scale = 1 / channel_std and unit_shift =
        -channel_mean / channel_std, the latent.scale / latent.shift that give the stored latents zero mean
        and unit std per channel (null for a channel of std 0)."""
        missing = self.missing_chunks()
        if missing:
            raise RuntimeError(f"latent shards at {self.out!r}: {len(missing)} chunks not written (first {missing[0]})")
        channels = self.shape[0]
        s1, s2, v = np.zeros(channels), np.zeros(channels), np.zeros(channels)
        count = 0
        for start in range(0, self.num_samples, block):
            m = np.asarray(self._mean[start:start + block], np.float64)
            s = np.asarray(self._std[start:start + block], np.float64)
            s1 += m.sum(axis=(0, 2, 3))
            s2 += (m * m).sum(axis=(0, 2, 3))
            v += (s * s).sum(axis=(0, 2, 3))
            count += m.shape[0] * m.shape[2] * m.shape[3]
        mean = s1 / count
        var_mean = np.maximum(s2 / count - mean * mean, 0.0)
        std = np.sqrt(var_mean + v / count)
        # latent.scale / latent.shift that give the sampled latents zero mean and unit std per channel
        unit_scale = [float(1 / s) if s > 0 else None for s in std]
        unit_shift = [float(-m / s) if s > 0 else None for m, s in zip(mean, std)]
        stats = dict(num_samples=self.num_samples, channel_mean=mean.tolist(), channel_std=std.tolist(),
                     posterior_mean_std=np.sqrt(var_mean).tolist(), unit_scale=unit_scale, unit_shift=unit_shift)
        _write_json(os.path.join(self.out, STATS), stats)
        return stats


class LatentShards:
    """Read side: rows gathered from the memory-mapped mean/std arrays. `raw`: they hold the latent
    space's own posterior, and latent.scale / latent.shift are still to apply (the trainer does)."""

    def __init__(self, root: str):
        self.meta = read_meta(root)
        self.raw = holds_raw_moments(self.meta, root)
        done = set(os.listdir(os.path.join(root, "done")))
        chunks = -(-self.meta["num_samples"] // self.meta["chunk_size"])
        missing = [c for c in range(chunks) if f"chunk_{c:06d}" not in done]
        if missing:
            raise RuntimeError(f"data.latents_root={root!r} is incomplete: {len(missing)} of {chunks} chunks missing "
                               "(rerun python -m engine.preprocess with the same arguments to finish it)")
        with open(os.path.join(root, INDEX)) as f:
            index = json.load(f)
        self.root, self.keys, self.labels = root, index["keys"], np.array(index["labels"], np.int64)
        self.mean = np.load(os.path.join(root, "mean.npy"), mmap_mode="r")
        self.std = np.load(os.path.join(root, "std.npy"), mmap_mode="r")
        self.shape = tuple(self.mean.shape[1:])
        stats_path = os.path.join(root, STATS)
        self.stats = json.load(open(stats_path)) if os.path.exists(stats_path) else None

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, row: int) -> str:
        return f"row {int(row)} of {self.root}"

    def rows_for(self, keys: list[str]) -> np.ndarray:
        """Row of each key, -1 where the shards have none."""
        position = {k: i for i, k in enumerate(self.keys)}
        return np.array([position.get(k, -1) for k in keys], np.int64)

    def read(self, rows: np.ndarray, flips: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) fp32 (B, C, h, w) of `rows`; flipped along the width where `flips` (so a latent
        stays in step with its horizontally flipped image)."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential in the memory map
        mean, std = np.empty((len(rows), *self.shape), np.float32), np.empty((len(rows), *self.shape), np.float32)
        mean[order] = self.mean[rows[order]]
        std[order] = self.std[rows[order]]
        if flips is not None and np.any(flips):
            f = np.asarray(flips, bool)
            mean[f] = mean[f][..., ::-1]
            std[f] = std[f][..., ::-1]
        return torch.from_numpy(mean), torch.from_numpy(std)
