"""ADM centre crop (the crop of ADM / REPA's `center_crop_arr`) and the PIL decode path.

center_crop_arr(image, res):
  1. while min(w, h) >= 2*res: (w, h) = (w//2, h//2) with a box filter;
  2. bicubic resize so that the shorter side is res: size (round(w*s), round(h*s)), s = res/min(w, h);
  3. crop res x res at ((w' - res)//2, (h' - res)//2).
`adm_geometry` gives the sizes of steps 1-3 from the original (w, h) alone; the DALI path uses it to
resize each image to exactly the same final size and crop at exactly the same offsets, but in one
antialiased bicubic resize instead of the box steps then bicubic (see engine.data.dali for the measured
difference).
"""
from __future__ import annotations


import numpy as np
from PIL import Image


def adm_geometry(width: int, height: int, res: int) -> tuple[int, int, int, int, int]:
    """(halvings, resized width, resized height, crop x, crop y) of center_crop_arr for a w x h image."""
    halvings = 0
    while min(width, height) >= 2 * res:
        width, height, halvings = width // 2, height // 2, halvings + 1
    scale = res / min(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    return halvings, new_w, new_h, (new_w - res) // 2, (new_h - res) // 2


def adm_geometry_batch(widths: np.ndarray, heights: np.ndarray, res: int) -> np.ndarray:
    """adm_geometry of many images at once: (N, 5) int64 rows as adm_geometry returns."""
    w, h = np.asarray(widths, np.int64).copy(), np.asarray(heights, np.int64).copy()
    halvings = np.zeros_like(w)
    while True:
        more = np.minimum(w, h) >= 2 * res
        if not more.any():
            break
        w, h, halvings = np.where(more, w // 2, w), np.where(more, h // 2, h), halvings + more
    scale = res / np.minimum(w, h)
    new_w, new_h = np.round(w * scale).astype(np.int64), np.round(h * scale).astype(np.int64)  # half to even, as round()
    return np.stack([halvings, new_w, new_h, (new_w - res) // 2, (new_h - res) // 2], 1)


def center_crop_arr(image: Image.Image, res: int) -> np.ndarray:
    """ADM centre crop of a PIL image to a (res, res, C) uint8 array."""
    while min(*image.size) >= 2 * res:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = res / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[top:top + res, left:left + res]


def decode_pil(data: bytes, res: int, flip: bool = False) -> np.ndarray:
    """Encoded image bytes -> ADM centre crop, (3, res, res) uint8; raises on undecodable data and on a
    header claiming more pixels than the cap (engine.data.index.check_pixels), before decoding."""
    from .index import open_image

    with open_image(data) as image:
        image.load()  # a truncated file raises here (PIL does not load truncated images by default)
        arr = center_crop_arr(image.convert("RGB"), res)
    if flip:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
