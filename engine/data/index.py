"""The sample index: every image of a data source with its label, byte location and size, built once
and checked once, so that a corrupt or missing file is found before training starts.

DALI decodes a whole batch in one operator, and a file that fails there fails the batch without
naming itself, so files are checked while the index is built:
  validate="header"  parse the image header (format, width, height) and, for JPEG/PNG, check that the
                     end-of-image marker is present (a truncated file lacks it). Cheap: two small reads.
  validate="full"    decode every image once with PIL.
A file that fails is left out of the index (on_corrupt="skip") or, with on_corrupt="error", the
index is an error naming every file that failed (`refuse_corrupt`). An image whose header claims more
than `max_image_pixels()` pixels (PIL's Image.MAX_IMAGE_PIXELS) is a decompression bomb and fails the
check undecoded, on every decode path (`check_pixels`). Results are cached per file (size, mtime), so
the check runs once per file; a later run rescans the tree and checks only new or changed files. The
image sizes from the header also give the exact ADM crop geometry for each sample
(engine.data.transforms.adm_geometry).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from PIL import Image

from engine.atomic_files import write_atomic

log = logging.getLogger("engine.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LABEL_EXTS = (".cls", ".label")
_INDEX_VERSION = 2  # 2: the decompression-bomb pixel cap


class CorruptImageError(RuntimeError):
    """An image that cannot be read, raised when on_corrupt="error"; the message names the file."""


def refuse_corrupt(found: list[tuple[str, str]], what: str = "image") -> None:
    """data.on_corrupt="error": one error naming every bad file found, as "file: reason; ..."."""
    if found:
        listed = "; ".join(f"{name}: {reason}" for name, reason in found)
        raise CorruptImageError(f"{len(found)} corrupt or missing {what}{'s' if len(found) > 1 else ''} "
                                f"(data.on_corrupt='error'; 'skip' leaves them out): {listed}")


def max_image_pixels() -> Optional[int]:
    """The decoded-pixel cap: PIL's Image.MAX_IMAGE_PIXELS (89,478,485 by default; None: no cap)."""
    return Image.MAX_IMAGE_PIXELS


class DecompressionBomb(ValueError):
    """An image header claiming more pixels than the cap (`check_pixels`)."""


def check_pixels(width: int, height: int) -> None:
    """Refuse, before any decoding, an image whose header claims more pixels than the cap (a
    decompression bomb: a few bytes that would decode for seconds into gigabytes of flat grey).
    PIL only warns between the cap and twice it; here that range is refused too."""
    limit = max_image_pixels()
    if limit is not None and width * height > limit:
        raise DecompressionBomb(f"decompression bomb: the header claims {width}x{height} = {width * height} pixels, "
                                f"above the cap of {limit} (PIL.Image.MAX_IMAGE_PIXELS); not decoded")


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy Image.open of encoded bytes (header only) with the pixel cap applied (`check_pixels`):
    every decode path opens images through here."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # beyond twice the cap: PIL refuses at open
        raise DecompressionBomb(f"decompression bomb: {error} (PIL.Image.MAX_IMAGE_PIXELS); not decoded") from None
    try:
        check_pixels(*image.size)
    except DecompressionBomb:
        image.close()
        raise
    return image


@dataclasses.dataclass
class SampleIndex:
    """Columns of the samples that passed the check, in a fixed order (sorted class, then file name;
    or tar shard, then member order). `keys` are stable ids: the path relative to the root for a folder,
    "<shard>.tar/<member>" for webdataset; latent shards are matched to images by key."""

    keys: list[str]
    paths: list[str]  # file holding the encoded bytes
    offsets: np.ndarray  # int64 byte offset in that file (0 for a plain file)
    sizes: np.ndarray  # int64 byte count
    labels: np.ndarray  # int64
    widths: np.ndarray  # int32
    heights: np.ndarray  # int32
    classes: list[str]  # class names by label
    skipped: list[tuple[str, str]]  # (file, reason) of files left out

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            if self.offsets[i]:
                f.seek(int(self.offsets[i]))
            data = f.read(int(self.sizes[i]))
        if len(data) != int(self.sizes[i]):
            raise OSError(f"short read: {len(data)} of {int(self.sizes[i])} bytes")
        return data

    def subset(self, keep: np.ndarray) -> "SampleIndex":
        keep = np.asarray(keep, dtype=np.int64)
        return dataclasses.replace(
            self, keys=[self.keys[i] for i in keep], paths=[self.paths[i] for i in keep],
            offsets=self.offsets[keep], sizes=self.sizes[keep], labels=self.labels[keep],
            widths=self.widths[keep], heights=self.heights[keep], skipped=list(self.skipped))


HEAD_BYTES = 1 << 18  # header check: enough for the image header behind large EXIF/ICC segments
TAIL_BYTES = 64


def check_image(data: bytes, full: bool, tail: Optional[bytes] = None) -> tuple[int, int]:
    """(width, height) of an encoded image; raises ValueError saying what is wrong. `data` is the whole
    file, or (with full=False) its first bytes with `tail` its last TAIL_BYTES bytes."""
    if len(data) == 0:
        raise ValueError("empty file")
    try:
        with open_image(data) as image:
            fmt, (width, height) = image.format, image.size
            if full:
                image.load()
    except DecompressionBomb:
        raise
    except Exception as error:  # PIL raises several types for undecodable data
        raise ValueError(f"not a readable image ({type(error).__name__}: {error})") from None
    # A truncated JPEG or PNG has a valid header but lacks its end marker; decoders may then fill the
    # rest with grey silently, so the header check looks for the marker near the end.
    tail = data[-TAIL_BYTES:] if tail is None else tail
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in tail:
        raise ValueError("truncated PNG (no IEND chunk)")
    if width < 1 or height < 1:
        raise ValueError(f"empty image {width}x{height}")
    return width, height


def check_file_range(path: str, offset: int, size: int, full: bool) -> tuple[int, int, str]:
    """Check the image stored in bytes [offset, offset+size) of `path`: (width, height, "") or
    (0, 0, reason). The header check reads only the head and the tail of the image."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            if full or size <= HEAD_BYTES + TAIL_BYTES:
                data = f.read(size)
                if len(data) != size:
                    raise ValueError(f"short read: {len(data)} of {size} bytes")
                return (*check_image(data, full), "")
            head = f.read(HEAD_BYTES)
            f.seek(offset + size - TAIL_BYTES)
            tail = f.read(TAIL_BYTES)
            if len(tail) != TAIL_BYTES:
                raise ValueError("short read at the end of the image")
            try:
                return (*check_image(head, False, tail), "")
            except ValueError:  # a header beyond the first bytes: check the whole image
                f.seek(offset)
                return (*check_image(f.read(size), False), "")
    except FileNotFoundError:
        return 0, 0, "missing file"
    except (OSError, ValueError) as error:
        return 0, 0, str(error)


def default_cache_dir(root: str) -> str:
    candidate = os.path.join(root, ".alignflow_cache")
    try:
        os.makedirs(candidate, exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    return os.path.join(os.path.expanduser("~"), ".cache", "alignflow", "index")


def _cache_path(cache_dir: str, source: str, root: str, validate: str) -> str:
    key = f"{_INDEX_VERSION}|{source}|{os.path.abspath(root)}|{validate}|{max_image_pixels()}"
    digest = hashlib.sha1(key.encode()).hexdigest()
    return os.path.join(cache_dir, f"index_{source}_{digest[:16]}.npz")


def _load_cache(path: str) -> dict:
    """{file key: (size, mtime_ns, width, height, reason)} of a previous check, or {}."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: (int(s), int(m), int(w), int(h), str(r)) for k, s, m, w, h, r in
                    zip(z["files"], z["size"], z["mtime"], z["width"], z["height"], z["reason"])}
    except (OSError, ValueError, KeyError):
        return {}


def _save_cache(path: str, entries: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files = list(entries)
    cols = list(zip(*entries.values())) if entries else [[], [], [], [], []]
    write_atomic(path, lambda f: np.savez(  # a concurrent reader sees the old or the new cache
        f, files=np.array(files, dtype=str), size=np.array(cols[0], np.int64), mtime=np.array(cols[1], np.int64),
        width=np.array(cols[2], np.int32), height=np.array(cols[3], np.int32), reason=np.array(cols[4], dtype=str)))


def _scan_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path relative to root, label), sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root={root!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"data.root={root!r} has no class subfolders (expected root/<class>/<image>.jpg)")
    items = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTS):
                    items.append((os.path.relpath(os.path.join(dirpath, fn), root), label))
    return classes, items


def index_folder(root: str, validate: str, on_corrupt: str, cache_dir: Optional[str], num_threads: int = 8,
                 source: str = "folder", scan=None) -> SampleIndex:
    """The checked index of the images under `root`: class folders, or `scan()`'s (classes, [(path relative
    to root, label)]) for a layout with its own labels (engine.data.repa)."""
    classes, items = scan() if scan is not None else _scan_folder(root)
    cache_file = _cache_path(cache_dir or default_cache_dir(root), source, root, validate)
    cache = _load_cache(cache_file)
    stats, todo = {}, []
    for rel, _ in items:
        try:
            st = os.stat(os.path.join(root, rel))
            stats[rel] = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stats[rel] = (-1, -1)
        hit = cache.get(rel)
        if hit is None or hit[:2] != stats[rel]:
            todo.append(rel)
    full = validate == "full"
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = dict(zip(todo, pool.map(lambda r: check_file_range(os.path.join(root, r), 0, stats[r][0], full)
                                          if stats[r][0] >= 0 else (0, 0, "missing file"), todo)))
    entries = {}
    for rel, _ in items:
        entries[rel] = (*stats[rel], *results[rel]) if rel in results else cache[rel]
    if todo:
        try:
            _save_cache(cache_file, entries)
        except OSError as error:
            log.warning("could not write the data index cache %s: %s", cache_file, error)
    keep, skipped = [], []
    for rel, label in items:
        size, _, width, height, reason = entries[rel]
        path = os.path.join(root, rel)
        if reason:
            skipped.append((path, reason))
        else:
            keep.append((rel, path, size, label, width, height))
    if on_corrupt == "error":
        refuse_corrupt(skipped)
    if not keep:
        raise ValueError(f"data.root={root!r}: no readable images ({len(skipped)} skipped)")
    return SampleIndex(
        keys=[k[0] for k in keep], paths=[k[1] for k in keep], offsets=np.zeros(len(keep), np.int64),
        sizes=np.array([k[2] for k in keep], np.int64), labels=np.array([k[3] for k in keep], np.int64),
        widths=np.array([k[4] for k in keep], np.int32), heights=np.array([k[5] for k in keep], np.int32),
        classes=classes, skipped=skipped)


def _tar_shards(root: str) -> list[str]:
    if os.path.isfile(root) and root.endswith(".tar"):
        return [root]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root={root!r} is neither a directory of .tar shards nor a .tar file")
    shards = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar"))
    if not shards:
        raise ValueError(f"data.root={root!r} holds no .tar shards")
    return shards


def _split_key(name: str) -> tuple[str, str]:
    # webdataset convention: the key is the member path up to the first dot of its base name
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(directory, stem), (dot + ext).lower()


def _index_shard(shard: str, full: bool, num_threads: int) -> list[list]:
    """[[member name, data offset, size, label, width, height, reason], ...] of one tar shard, in member
    order; the tar headers are walked without reading the image bytes, then each image is checked."""
    samples: dict[str, dict] = {}
    with tarfile.open(shard, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_key(member.name)
            sample = samples.setdefault(key, {})
            if ext in IMAGE_EXTS:
                sample["image"] = (member.name, member.offset_data, member.size)
            elif ext in LABEL_EXTS:
                sample["label"] = tar.extractfile(member).read().decode(errors="replace").strip()

    def check(item):
        key, sample = item
        name, offset, size = sample["image"]
        width, height, reason = check_file_range(shard, offset, size, full)
        label = -1
        if not reason:
            try:
                label = int(sample["label"])
            except (KeyError, ValueError):
                reason = f"no integer label (.cls) for sample {key!r}"
        return [name, offset, size, label, width, height, reason]

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        return list(pool.map(check, [(k, v) for k, v in samples.items() if "image" in v]))


def index_webdataset(root: str, validate: str, on_corrupt: str, cache_dir: Optional[str] = None,
                     num_threads: int = 8) -> SampleIndex:
    """Index tar shards (a sample: <key>.jpg|png|... plus <key>.cls), cached per shard (size, mtime)."""
    full = validate == "full"
    shards = _tar_shards(root)
    cache_dir = cache_dir or default_cache_dir(root if os.path.isdir(root) else os.path.dirname(root) or ".")
    keys, paths, offsets, sizes, labels, widths, heights, skipped = [], [], [], [], [], [], [], []
    for shard in shards:
        st = os.stat(shard)
        stamp = [st.st_size, st.st_mtime_ns, validate, _INDEX_VERSION, max_image_pixels()]
        digest = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:16]
        cache_file = os.path.join(cache_dir, f"shard_{os.path.basename(shard)}_{digest}.json")
        entries = None
        try:
            with open(cache_file) as f:
                cached = json.load(f)
            if cached["stamp"] == stamp:
                entries = cached["entries"]
        except (OSError, ValueError, KeyError):
            pass
        if entries is None:
            entries = _index_shard(shard, full, num_threads)
            try:
                write_atomic(cache_file, lambda f: f.write(json.dumps(dict(stamp=stamp, entries=entries)).encode()))
            except OSError as error:
                log.warning("could not write the data index cache %s: %s", cache_file, error)
        shard_name = os.path.basename(shard)
        for name, offset, size, label, width, height, reason in entries:
            where = f"{shard}/{name}"
            if reason:
                skipped.append((where, reason))
                continue
            keys.append(f"{shard_name}/{name}")
            paths.append(shard)
            offsets.append(offset)
            sizes.append(size)
            labels.append(label)
            widths.append(width)
            heights.append(height)
    if on_corrupt == "error":
        refuse_corrupt(skipped)
    if not keys:
        raise ValueError(f"data.root={root!r}: no readable samples in the tar shards ({len(skipped)} skipped)")
    labels_arr = np.array(labels, np.int64)
    if labels_arr.min() < 0:
        raise ValueError(f"data.root={root!r}: negative label {int(labels_arr.min())}")
    num_classes = int(labels_arr.max()) + 1
    return SampleIndex(keys=keys, paths=paths, offsets=np.array(offsets, np.int64), sizes=np.array(sizes, np.int64),
                       labels=labels_arr, widths=np.array(widths, np.int32), heights=np.array(heights, np.int32),
                       classes=[str(c) for c in range(num_classes)], skipped=skipped)
