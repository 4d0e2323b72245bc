"""Typed configuration of the data pipeline, validated when it is constructed."""
from __future__ import annotations


import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from engine.configurable import FromDict, invalid

SOURCES = ("builtin", "folder", "webdataset", "latent_shards", "repa")
DECODERS = ("dali", "pil", "auto")
DALI_DEVICES = ("auto", "cpu", "mixed")
CENTER_CROPS = ("adm",)
ON_CORRUPT = ("skip", "error")
VALIDATE = ("header", "full")


def _bad(key: str, value: Any, allowed: str):
    return invalid(key, value, allowed)


@dataclass
class DataConfig(FromDict):
    """Where the images come from and how they are decoded, cropped, shuffled and sharded.

    `source`:
      builtin        the procedurally generated class-conditional set (engine.data.builtin), written
                     under `root` on first use;
      folder         an ImageNet-style tree: root/<class>/<image>.jpg, labels by sorted class name;
      webdataset     tar shards (root: a directory of *.tar, or one .tar) whose samples are
                     <key>.jpg|jpeg|png|webp plus <key>.cls (the integer label);
      latent_shards  the images of a folder tree at `root` together with their pre-extracted latents
                     at `latents_root` (same as folder + latents_root);
      repa           REPA's preprocessed layout at `root` (images/, vae-sd/ with dataset.json), read as it
                     is (engine.data.repa): its SD-VAE moments come with each batch, random_flip false.
    `latents_root` with any image source reads latent shards (engine.data.latent_shards) in step with the
    images: each batch also carries "latent_mean" / "latent_std".
    """

    source: str = "builtin"
    root: str = "data/builtin"
    resolution: int = 256
    num_classes: Optional[int] = None  # None: taken from the data; else checked against it
    batch_size: int = 32  # per rank
    center_crop: str = "adm"
    random_flip: bool = True
    shuffle: bool = True
    decoder: str = "auto"  # dali (nvJPEG) on a GPU where importable, else pil (the reason is logged)
    dali_device: str = "auto"  # mixed (nvJPEG on the GPU) when the loader's device is CUDA, else cpu
    num_threads: int = 4  # DALI CPU threads
    prefetch: int = 2  # DALI prefetch queue depth
    num_workers: int = 2  # PIL path: torch DataLoader worker processes (0: in the main process)
    on_corrupt: str = "skip"
    validate: str = "header"  # file check when the index is built: see engine.data.index
    seed: int = 0
    latents_root: Optional[str] = None
    cache_dir: Optional[str] = None  # index cache; None: <root>/.alignflow_cache, else ~/.cache
    builtin_images_per_class: int = 64
    builtin_image_size: int = 64

    def __post_init__(self) -> None:
        for key, typ in (("resolution", int), ("batch_size", int), ("num_threads", int), ("prefetch", int),
                         ("num_workers", int), ("seed", int), ("builtin_images_per_class", int),
                         ("builtin_image_size", int)):
            value = getattr(self, key)
            if not isinstance(value, typ) or isinstance(value, bool):
                raise _bad(key, value, "an integer")
        for key in ("random_flip", "shuffle"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, getattr(self, key), "true or false")
        for key, allowed in (("source", SOURCES), ("decoder", DECODERS), ("dali_device", DALI_DEVICES),
                             ("center_crop", CENTER_CROPS), ("on_corrupt", ON_CORRUPT), ("validate", VALIDATE)):
            if getattr(self, key) not in allowed:
                raise _bad(key, getattr(self, key), f"one of {', '.join(allowed)}")
        for key in ("root",):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise _bad(key, getattr(self, key), "a non-empty path string")
        for key in ("latents_root", "cache_dir"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad(key, value, "a path string or null")
        for key, low in (("resolution", 8), ("batch_size", 1), ("num_threads", 1), ("prefetch", 1),
                         ("num_workers", 0), ("seed", 0), ("builtin_images_per_class", 1),
                         ("builtin_image_size", 8)):
            if getattr(self, key) < low:
                raise _bad(key, getattr(self, key), f"an integer >= {low}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int)
                                             or isinstance(self.num_classes, bool) or self.num_classes < 1):
            raise _bad("num_classes", self.num_classes, "a positive integer or null (taken from the data)")
        if self.source == "repa" and self.random_flip:
            raise _bad("random_flip", True, "false with source 'repa' (its vae-sd/ latents are of the unflipped "
                       "images only; REPA trains without flips)")
        if self.source == "repa" and self.latents_root is not None:
            raise _bad("latents_root", self.latents_root, "null with source 'repa' (its latents are root/vae-sd)")
        if self.source == "latent_shards" and self.latents_root is None:
            raise _bad("latents_root", None, "a path when source='latent_shards'")


    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
