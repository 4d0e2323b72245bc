"""The built-in data set: procedurally generated class-conditional images written as real JPEG files
in an ImageNet-style tree (root/<class>/<image>.jpg), so decoding, the encoder, the latents and
training all run with no download.

Each class is one pattern family (discs, squares, triangles, stripes at an orientation, checkers,
rings, crosses, ...) with its own colour palette; every image varies position, size, phase, colours
and background. Past the number of families, families repeat with a shifted palette.
"""
from __future__ import annotations

import colorsys
import contextlib
import fcntl
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from engine.atomic_files import write_atomic

FAMILIES = ("discs", "squares", "triangles", "hstripes", "vstripes", "dstripes", "checkers", "rings",
            "crosses", "blobs")
MANIFEST = "manifest.json"
_FORMAT_VERSION = 1


def class_names(num_classes: int) -> list[str]:
    return [f"{c:03d}_{FAMILIES[c % len(FAMILIES)]}" for c in range(num_classes)]


def _palette(c: int, rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    # Foreground hue fixed per class (golden-ratio spacing) with jitter; a dim background of another hue.
    hue = (c * 0.618034 + rng.normal(0, 0.02)) % 1.0
    fg = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    bg = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.35))
    return tuple(int(255 * v) for v in fg), tuple(int(255 * v) for v in bg)


def _stripes(size, angle, period, phase, fg, bg):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    on = (np.sin(2 * math.pi * (u / period) + phase) > 0)[..., None]
    return np.where(on, np.array(fg, np.uint8), np.array(bg, np.uint8))


def render(c: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class c."""
    family = FAMILIES[c % len(FAMILIES)]
    fg, bg = _palette(c, rng)
    s = size
    if family in ("hstripes", "vstripes", "dstripes", "checkers"):
        period, phase = rng.uniform(s / 8, s / 4), rng.uniform(0, 2 * math.pi)
        base = {"hstripes": math.pi / 2, "vstripes": 0.0, "dstripes": math.pi / 4}.get(family, 0.0)
        arr = _stripes(s, base + rng.normal(0, 0.08), period, phase, fg, bg)
        if family == "checkers":
            other = _stripes(s, math.pi / 2, period, rng.uniform(0, 2 * math.pi), fg, bg)
            arr = np.where((arr == np.array(fg, np.uint8)).all(-1, keepdims=True)
                           ^ (other == np.array(fg, np.uint8)).all(-1, keepdims=True),
                           np.array(fg, np.uint8), np.array(bg, np.uint8))
        image = Image.fromarray(arr)
    else:
        image = Image.new("RGB", (s, s), bg)
        draw = ImageDraw.Draw(image)
        count = int(rng.integers(1, 4))
        for _ in range(count):
            r = rng.uniform(0.12, 0.3) * s
            cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
            if family == "discs":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
            elif family == "squares":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
            elif family == "triangles":
                a = rng.uniform(0, 2 * math.pi / 3)
                draw.polygon([(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3))
                              for k in range(3)], fill=fg)
            elif family == "rings":
                for k, rr in enumerate(np.linspace(r, r / 4, 3)):
                    draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fg if k % 2 == 0 else bg)
            elif family == "crosses":
                w = r / 3
                draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
                draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
            else:  # blobs: soft gaussian spots
                yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
                g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 1.5) ** 2))[..., None]
                arr = np.asarray(image).astype(np.float32)
                arr = arr * (1 - g) + np.array(fg, np.float32) * g
                image = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
                draw = ImageDraw.Draw(image)
    arr = np.asarray(image).astype(np.float32) + rng.normal(0, 4, (s, s, 3))  # mild sensor-like noise
    return arr.clip(0, 255).astype(np.uint8)


@contextlib.contextmanager
def _locked(root: str):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # several ranks may ask for the same set at once
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(root: str, params: dict) -> bool:
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("params") != params:
        return False
    return all(os.path.exists(os.path.join(root, rel)) for rel in manifest["files"])


def _write_class(root: str, c: int, name: str, images_per_class: int, resolution: int, seed: int,
                 quality: int) -> list[str]:
    os.makedirs(os.path.join(root, name), exist_ok=True)
    rng = np.random.default_rng([seed, c])
    files = []
    for i in range(images_per_class):
        rel = os.path.join(name, f"{name}_{i:05d}.jpg")
        Image.fromarray(render(c, resolution, rng)).save(os.path.join(root, rel), format="JPEG", quality=quality)
        files.append(rel)
    return files


def make_builtin_dataset(root: str, num_classes: int = 10, images_per_class: int = 64, resolution: int = 64,
                         seed: int = 0, quality: int = 92, workers: int | None = None) -> dict:
    """Write the built-in set under `root` unless it is already complete (same parameters, every
    file present); returns the manifest {"params", "classes", "files"}. Classes are written in
    parallel by `workers` threads (default: one per core; each class has its own random stream, so the
    files do not depend on it; NumPy and PIL's JPEG encoder release the GIL: 2.2x on 2 cores), the
    manifest last, so an interrupted run is redone on the next call."""
    if num_classes < 1 or images_per_class < 1 or resolution < 8:
        raise ValueError(f"make_builtin_dataset: num_classes={num_classes}, images_per_class={images_per_class}, "
                         f"resolution={resolution}; need >= 1, >= 1, >= 8")
    params = dict(version=_FORMAT_VERSION, num_classes=num_classes, images_per_class=images_per_class,
                  resolution=resolution, seed=seed, quality=quality)
    with _locked(root):
        manifest_path = os.path.join(root, MANIFEST)
        if _complete(root, params):
            with open(manifest_path) as f:
                return json.load(f)
        if os.path.exists(manifest_path):  # another parameter set: remove what we wrote before
            with open(manifest_path) as f:
                old = json.load(f)
            os.remove(manifest_path)
            for name in old.get("classes", []):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        names = class_names(num_classes)
        workers = min(num_classes, workers or os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            per_class = pool.map(lambda c: _write_class(root, c, names[c], images_per_class, resolution, seed,
                                                        quality), range(num_classes))
            files = [rel for rels in per_class for rel in rels]
        manifest = dict(params=params, classes=names, files=files)
        write_atomic(manifest_path, lambda f: f.write(json.dumps(manifest).encode()))
        return manifest
