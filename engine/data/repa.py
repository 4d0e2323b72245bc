"""REPA's preprocessed ImageNet (`data.source: repa`), read as REPA's preprocessing/dataset_tools.py
writes it (`convert` with center-crop-dhariwal, then `encode`), with no re-encoding:

    root/images/00000/img00000000.png ...          the pre-cropped images
    root/vae-sd/00000/img-mean-std-00000000.npy    per image: float32 (2C, h, w), the SD-VAE posterior
                                                   mean (first C channels) and std (last C), unscaled
    root/vae-sd/dataset.json                       {"labels": [["00000/img-mean-std-00000000.npy", label], ...]}

Images and latents pair by sorted file name, as REPA's dataset.CustomDataset pairs them (the counts must
agree), and pair i takes the label of latent file i. The latents are raw: the trainer samples them as
REPA's sample_posterior does, z = (mean + std * eps) * latent.scale + latent.shift (REPA: 0.18215, 0).
The layout holds the latents of the unflipped images only and REPA trains without flips, so
`data.random_flip` must be false.

A corrupt or missing image is skipped and counted as for the other sources (engine.data.index); a
latent file that is missing or of another size than the first one is skipped and counted too (or,
with `on_corrupt: error`, an error naming it); `validate: full` also parses every latent's .npy header.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .index import IMAGE_EXTS, CorruptImageError, index_folder, refuse_corrupt

IMAGES, LATENTS, LABELS = "images", "vae-sd", "dataset.json"


def _walk(directory: str, exts: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        found += [os.path.relpath(os.path.join(dirpath, f), directory) for f in filenames if f.lower().endswith(exts)]
    return sorted(found)


def _npy_header(path: str) -> tuple[tuple, np.dtype]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), dtype


class RepaLatents:
    """Read side of root/vae-sd: raw (mean, std) fp32 (B, C, h, w) of rows of `files`."""

    raw = True  # the trainer applies latent.scale / latent.shift

    def __init__(self, directory: str, files: list[str], shape: tuple[int, int, int]):
        self.directory, self.files = directory, files
        self.shape = (shape[0] // 2, *shape[1:])  # (C, h, w) of the latent

    def describe(self, row: int) -> str:
        return os.path.join(self.directory, self.files[int(row)])

    def read(self, rows: np.ndarray, flips=None) -> tuple[torch.Tensor, torch.Tensor]:
        if flips is not None and np.any(flips):
            raise ValueError("REPA's layout has no latents of flipped images; set data.random_flip: false")
        moments = np.empty((len(rows), 2 * self.shape[0], *self.shape[1:]), np.float32)
        for i, row in enumerate(np.asarray(rows, np.int64)):
            path = os.path.join(self.directory, self.files[row])
            try:
                moments[i] = np.load(path)
            except Exception as error:  # noqa: BLE001 - passed the index check, unreadable now
                raise CorruptImageError(f"cannot read the latent {path}: {error}") from None
        mean, std = np.split(moments, 2, axis=1)
        return torch.from_numpy(np.ascontiguousarray(mean)), torch.from_numpy(np.ascontiguousarray(std))


def index_repa(root: str, validate: str, on_corrupt: str, cache_dir, num_threads: int = 8):
    """(SampleIndex of root/images, RepaLatents of root/vae-sd, latent row of each index sample)."""
    images_dir, latents_dir = os.path.join(root, IMAGES), os.path.join(root, LATENTS)
    for directory in (images_dir, latents_dir):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"data.root={root!r} is not in REPA's layout: {directory} is missing "
                                    f"(expected {IMAGES}/ and {LATENTS}/ from REPA's preprocessing/dataset_tools.py)")
    labels_path = os.path.join(latents_dir, LABELS)
    try:
        with open(labels_path) as f:
            labels = dict(json.load(f)["labels"] or [])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"data.root={root!r}: {labels_path} is not REPA's label file ({error})") from None
    images = _walk(images_dir, IMAGE_EXTS)
    latents = _walk(latents_dir, (".npy",))
    if len(images) != len(latents) or not images:
        raise ValueError(f"data.root={root!r}: {len(images)} images in {IMAGES}/ but {len(latents)} latents in "
                         f"{LATENTS}/; REPA pairs them by sorted name, so the counts must agree (and be > 0)")
    missing = [name for name in latents if name.replace("\\", "/") not in labels]
    if missing:
        raise ValueError(f"data.root={root!r}: {labels_path} has no label for {missing[0]} "
                         f"({len(missing)} latents without one)")
    pair_labels = [int(labels[name.replace("\\", "/")]) for name in latents]
    num_classes = max(pair_labels) + 1
    classes = [str(c) for c in range(num_classes)]
    index = index_folder(images_dir, validate, on_corrupt, cache_dir, num_threads, source="repa",
                         scan=lambda: (classes, list(zip(images, pair_labels))))
    row_of = {name: i for i, name in enumerate(images)}
    rows = np.array([row_of[key] for key in index.keys], np.int64)

    # The latent files: present, all of one size (a truncated file is shorter), headers under validate=full.
    def check(name):
        path = os.path.join(latents_dir, name)
        try:
            size = os.path.getsize(path)
            header = _npy_header(path) if validate == "full" else None
            return size, header, ""
        except FileNotFoundError:
            return -1, None, "missing file"
        except (OSError, ValueError) as error:
            return -1, None, f"not a .npy file ({error})"
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        checks = list(pool.map(check, [latents[r] for r in rows]))
    good = [i for i, (_, _, reason) in enumerate(checks) if not reason]
    if not good:
        raise ValueError(f"data.root={root!r}: no readable latents in {LATENTS}/")
    first = os.path.join(latents_dir, latents[rows[good[0]]])
    shape, dtype = _npy_header(first)
    if len(shape) != 3 or shape[0] % 2 or dtype != np.float32:
        raise ValueError(f"{first} holds {dtype} {shape}; REPA's latents are float32 (2C, h, w): mean and std")
    expected_size = checks[good[0]][0]
    keep, skipped = [], []
    for i, (size, header, reason) in enumerate(checks):
        if not reason and size != expected_size:
            reason = f"{size} bytes, the others have {expected_size} (truncated or another shape)"
        if not reason and header is not None and header != (shape, dtype):
            reason = f"holds {header[1]} {header[0]}, the others {dtype} {shape}"
        if reason:
            skipped.append((os.path.join(latents_dir, latents[rows[i]]), reason))
        else:
            keep.append(i)
    if on_corrupt == "error":
        refuse_corrupt(skipped, "latent")
    if skipped:
        index = index.subset(np.array(keep, np.int64))
        index.skipped.extend(skipped)
        rows = rows[keep]
    return index, RepaLatents(latents_dir, latents, shape), rows
