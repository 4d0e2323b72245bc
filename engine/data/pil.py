"""PIL decode path: a torch DataLoader whose workers each decode one whole batch of the plan with the
exact ADM centre crop. Used where DALI is absent, as the reference for DALI, and by preprocessing."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .index import SampleIndex
from .transforms import decode_pil

MAX_SUBSTITUTES = 16


def decode_batch(index: SampleIndex, indices: np.ndarray, flips: np.ndarray, res: int,
                 on_corrupt: str) -> dict:
    """Decode the samples `indices` of `index`. A sample that fails to read or decode is replaced by the
    next readable sample in index order (deterministic), and reported in "failed" as (file, reason);
    with on_corrupt="error" the batch is an error naming every file of it that failed."""
    from .index import refuse_corrupt

    n = len(index)
    images = np.empty((len(indices), 3, res, res), np.uint8)
    used = np.empty(len(indices), np.int64)
    failed = []
    for slot, (i, flip) in enumerate(zip(indices.tolist(), flips.tolist())):
        for attempt in range(MAX_SUBSTITUTES):
            j = (i + attempt) % n
            try:
                images[slot] = decode_pil(index.read(j), res, bool(flip))
                used[slot] = j
                break
            except Exception as error:  # any read/decode failure of one file
                failed.append((index.paths[j] if not index.offsets[j] else f"{index.paths[j]}/{index.keys[j]}",
                               f"{type(error).__name__}: {error}"))
                if on_corrupt == "error":
                    break  # no substitute: the batch is refused below, naming every failure
        else:
            raise RuntimeError(f"{MAX_SUBSTITUTES} consecutive unreadable images from {index.paths[i]}: "
                               "the data source looks broken")
    if on_corrupt == "error":
        refuse_corrupt(failed)
    return dict(image=torch.from_numpy(images), label=torch.from_numpy(index.labels[used]),
                indices=torch.from_numpy(used), failed=failed)


class _PlanDataset(torch.utils.data.Dataset):
    def __init__(self, index, plan_indices, plan_flips, res, on_corrupt):
        self.index, self.plan_indices, self.plan_flips = index, plan_indices, plan_flips
        self.res, self.on_corrupt = res, on_corrupt

    def __len__(self):
        return len(self.plan_indices)

    def __getitem__(self, step):
        return decode_batch(self.index, self.plan_indices[step], self.plan_flips[step], self.res, self.on_corrupt)


def _collate(item):
    return item


class PilBackend:
    name = "pil"

    def __init__(self, index: SampleIndex, res: int, on_corrupt: str, num_workers: int, pin_memory: bool):
        self.index, self.res, self.on_corrupt = index, res, on_corrupt
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def iterate(self, plan_indices: np.ndarray, plan_flips: np.ndarray) -> Iterator[dict]:
        """Yield {"image" uint8 (B,3,R,R) CPU, "label", "indices" (the samples actually used), "failed"}
        for each step of the plan, in order."""
        dataset = _PlanDataset(self.index, plan_indices, plan_flips, self.res, self.on_corrupt)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=self.num_workers, collate_fn=_collate,
            pin_memory=self.pin_memory, prefetch_factor=2 if self.num_workers > 0 else None)
        yield from loader
