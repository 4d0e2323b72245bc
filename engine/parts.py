"""A resumable directory of parts: one `batch_<b>.npz` per global batch b, beside a `meta.json` of the
settings that made them. The sampler keeps its images there (`engine.sample`, `OUT/parts/`), feature
extraction its Inception features (`engine.evaluate`, `OUT/inception_parts/<name>/`).

A run opens the directory on one rank (`open_parts`), asks which parts are still to be made
(`parts_to_make`: every rank checks a share; a part counts as made when it loads and passes the
caller's check, so a rerun skips those and remakes the missing, truncated or wrong ones), writes each
part atomically (`write_part`) and reads them back in order (`read_parts`).

Parts made with other settings (a `meta.json` that differs from this run's, is unreadable, or is
missing beside parts) are handled as the caller says:
- `stale="refuse"` (the sampler: its parts are hours of GPU time and resuming is a promise to the
  user): a one-line ValueError naming each differing setting with its value there and now; the
  user reruns with the same settings or passes --overwrite;
- `stale="delete"` (the feature cache: keyed by the source file and the weights, cheap to redo,
  nothing for the user to decide): the parts are deleted and made afresh.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from engine.atomic_files import write_atomic
from engine.distributed import DistInfo, gather_sorted

log = logging.getLogger("engine.parts")

META_FILE = "meta.json"
STALE_POLICIES = ("refuse", "delete")


def part_path(parts_dir: str, batch: int) -> str:
    return os.path.join(parts_dir, f"batch_{batch:06d}.npz")


def stale_reason(parts_dir: str, meta: dict, defaults: dict | None = None) -> str | None:
    """None when the parts in `parts_dir` (if any) were made with `meta`; else why not, one line.
    Only `meta`'s keys are compared; a key missing there counts as its value in `defaults` (a
    setting added after those parts were written)."""
    meta_path = os.path.join(parts_dir, META_FILE)
    if not os.path.exists(meta_path):
        if any(name.startswith("batch_") for name in os.listdir(parts_dir)):
            return f"{parts_dir} holds parts but no {META_FILE} (their settings are unknown)"
        return None
    try:
        with open(meta_path) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError(f"a JSON {type(old).__name__}, expected an object")
    except (OSError, ValueError) as error:
        return f"{meta_path} is unreadable ({error})"
    there = {key: old.get(key, (defaults or {}).get(key)) for key in meta}
    differing = [key for key in meta if there[key] != meta[key]]
    if not differing:
        return None
    details = "; ".join(f"{key}: {there[key]!r} there, {meta[key]!r} now" for key in differing)
    return f"{parts_dir} holds parts made with other settings ({details}; rerun with those to resume)"


def open_parts(parts_dir: str, meta: dict, *, stale: str, overwrite: bool = False,
               defaults: dict | None = None) -> None:
    """Create `parts_dir` with `meta.json`, or check that the parts already there were made with `meta`
    and handle them by `stale` where not (see the module's docstring); `overwrite` deletes them first.
    Also removes what a process killed while writing left behind. Call it on one rank (run_on_main)."""
    if stale not in STALE_POLICIES:
        raise ValueError(f"stale={stale!r}; allowed: {', '.join(STALE_POLICIES)}")
    if os.path.exists(parts_dir) and not os.path.isdir(parts_dir):
        raise ValueError(f"{parts_dir} is a file; it must be a directory of parts")
    if overwrite and os.path.isdir(parts_dir):
        shutil.rmtree(parts_dir)
    reason = stale_reason(parts_dir, meta, defaults) if os.path.isdir(parts_dir) else None
    if reason is not None and stale == "refuse":
        raise ValueError(f"{reason}; pass --overwrite to delete them")
    if reason is not None:
        log.info("%s; deleting them", reason)
        shutil.rmtree(parts_dir)
    os.makedirs(parts_dir, exist_ok=True)
    meta_path = os.path.join(parts_dir, META_FILE)
    if not os.path.exists(meta_path):
        write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    for name in os.listdir(parts_dir):
        if ".tmp-" in name:
            os.remove(os.path.join(parts_dir, name))


def part_problem(path: str, check: Callable) -> str | None:
    """None when the part at `path` loads and check(part) (the open np.load of it) returns None; else
    what is wrong: "missing", "unreadable (...)" or what `check` says."""
    if not os.path.exists(path):
        return "missing"
    try:
        with np.load(path) as part:
            return check(part)
    except Exception as error:  # noqa: BLE001 - truncated zip, bad CRC, missing key ...
        return f"unreadable ({type(error).__name__}: {error})"


@dataclass
class PartsToMake:
    missing: list[int]  # every batch whose part is absent or wrong, over all ranks, sorted
    corrupt: list[int]  # those among them whose part was there but wrong
    mine: list[int]     # this rank's share of `missing`


def parts_to_make(info: DistInfo, parts_dir: str, num_batches: int, check: Callable) -> PartsToMake:
    """The batches of 0 .. num_batches - 1 whose part is still to be made (collective). Rank r checks
    batches b with b % world == r, check(part, b) as in `part_problem`, and warns about each part that
    is there but wrong; the batches to make are dealt out evenly, so on a fresh run rank r makes the
    batches b % world == r."""
    missing, corrupt = [], []
    for batch in range(info.rank, num_batches, info.world_size):
        path = part_path(parts_dir, batch)
        problem = part_problem(path, lambda part: check(part, batch))
        if problem is not None:
            missing.append(batch)
            if problem != "missing":
                corrupt.append(batch)
                log.warning("%s %s; making it again", path, problem)
    missing, corrupt = gather_sorted(info, missing), gather_sorted(info, corrupt)
    return PartsToMake(missing, corrupt, missing[info.rank::info.world_size])


def write_part(parts_dir: str, batch: int, **arrays: np.ndarray) -> str:
    """The part of `batch` (np.savez of `arrays`), written atomically: a reader sees all of it or none."""
    return write_atomic(part_path(parts_dir, batch), lambda f: np.savez(f, **arrays))


def read_parts(parts_dir: str, num_batches: int, keys) -> Iterator[dict[str, np.ndarray]]:
    """The `keys` arrays of parts 0 .. num_batches - 1, in order, one part in memory at a time."""
    for batch in range(num_batches):
        with np.load(part_path(parts_dir, batch)) as part:
            yield {key: part[key] for key in keys}
