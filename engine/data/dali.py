"""DALI decode path: encoded bytes in, ADM-cropped uint8 (B, 3, R, R) batches out.

The order of samples is decided in Python (engine.data.loader: a permutation of seed+epoch, sliced per
rank and per step) and fed through `fn.external_source`, so one pipeline serves folders and tar shards
and a resumed run sees exactly the same batches. The bytes of a batch are read by a thread pool. DALI's
own reader sharding (shard_id/num_shards) is not used: it shards a fixed file list in contiguous
blocks and shuffles through a buffer, which cannot reproduce a global per-epoch permutation nor start
mid-epoch.

Pipeline: external_source(bytes, label, flip, size, crop position) -> decoders.image (device "mixed":
nvJPEG on the GPU; "cpu": libjpeg-turbo, CPU-only pipeline with device_id=None) -> resize to the exact
ADM size of each image (from its header, engine.data.transforms.adm_geometry) with an antialiased
bicubic filter -> crop_mirror_normalize (ADM crop offsets, flip, HWC->CHW, uint8).

Difference to the PIL reference (center_crop_arr), measured on JPEG files with the CPU decoder
(bit-identical decode to PIL's libjpeg-turbo): when the image is not halved first (min side < 2 R,
e.g. ImageNet 500x375 at R=256) the mean absolute difference is ~0.2 grey levels and the maximum 1-2
(bicubic kernels of DALI and PIL differ in rounding). When ADM halves with a box filter first (min side
>= 2 R), DALI's single antialiased cubic resize is sharper than box-then-bicubic: mean ~1 level on
smooth images, up to several levels on pixel noise. tests/engine/test_data.py states the tolerances.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np
import torch

from .index import CorruptImageError, SampleIndex, check_image, refuse_corrupt
from .pil import MAX_SUBSTITUTES
from .transforms import adm_geometry_batch

log = logging.getLogger("engine.data")


def dali_available() -> tuple[bool, str]:
    """(importable, reason if not)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising OSError on a missing library
        return False, f"nvidia.dali cannot be imported ({type(error).__name__}: {error})"
    return True, ""


class DaliBackend:
    name = "dali"

    def __init__(self, index: SampleIndex, res: int, batch_size: int, dali_device: str, device: torch.device,
                 num_threads: int, prefetch: int, seed: int, on_corrupt: str = "skip"):
        self.index, self.res, self.batch_size = index, res, batch_size
        self.decode_device = dali_device  # "cpu" or "mixed"
        self.device = device
        self.num_threads, self.prefetch, self.seed = num_threads, prefetch, seed
        self.on_corrupt = on_corrupt
        if dali_device == "mixed":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None  # CPU-only pipeline: no CUDA context is created
        # Per-sample resize target and crop position, from the header sizes (exact ADM geometry).
        # crop_mirror_normalize places the window at round(pos * (extent - crop)); pos = offset/(extent-crop)
        # reproduces the integer ADM offset exactly.
        geometry = adm_geometry_batch(index.widths, index.heights, res)
        new_w, new_h, left, top = (geometry[:, k].astype(np.float64) for k in range(1, 5))
        sizes = np.stack([new_h, new_w], 1).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            crop_pos = np.stack([np.where(new_w > res, left / (new_w - res), 0.5),
                                 np.where(new_h > res, top / (new_h - res), 0.5)], 1).astype(np.float32)
        self.sizes, self.crop_pos = sizes, crop_pos
        self._io = ThreadPoolExecutor(max(1, num_threads))
        self._feed: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._used: dict[int, tuple[np.ndarray, list]] = {}  # relative step -> (samples used, failures)

    def _read(self, i: int) -> tuple[int, np.ndarray, list]:
        """(sample used, its bytes, failures): a file that cannot be read or no longer passes the header
        check is replaced by the next readable sample in index order, as on the PIL path."""
        failures = []
        for attempt in range(MAX_SUBSTITUTES):
            j = (i + attempt) % len(self.index)
            try:
                data = self.index.read(j)
                check_image(data, full=False)
                return j, np.frombuffer(data, np.uint8), failures
            except Exception as error:  # any read or check failure of one file
                name = self.index.paths[j] if not self.index.offsets[j] else f"{self.index.paths[j]}/{self.index.keys[j]}"
                failures.append((name, f"{type(error).__name__}: {error}"))
                if self.on_corrupt == "error":
                    return -1, np.empty(0, np.uint8), failures  # no substitute: _source refuses the batch
        raise RuntimeError(f"{MAX_SUBSTITUTES} consecutive unreadable images from {self.index.paths[i]}")

    def _source(self, batch_info):
        plan_indices, plan_flips = self._feed
        step = batch_info.iteration
        if step >= len(plan_indices):
            raise StopIteration
        results = list(self._io.map(self._read, plan_indices[step].tolist()))
        if self.on_corrupt == "error":
            refuse_corrupt([f for r in results for f in r[2]])  # every bad file of the batch, in one error
        used = np.array([r[0] for r in results], np.int64)
        self._used[step] = (used, [f for r in results for f in r[2]])
        return ([r[1] for r in results], [self.index.labels[j:j + 1] for j in used],
                [np.array(f, np.int32) for f in plan_flips[step]], [self.sizes[j] for j in used],
                [self.crop_pos[j, 0] for j in used], [self.crop_pos[j, 1] for j in used])

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        res, decode_device = self.res, self.decode_device

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.prefetch, seed=self.seed)
        def pipeline():
            encoded, labels, flips, sizes, pos_x, pos_y = fn.external_source(
                source=self._source, num_outputs=6, batch=True, batch_info=True,
                dtype=[types.UINT8, types.INT64, types.INT32, types.FLOAT, types.FLOAT, types.FLOAT])
            images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, size=sizes, min_filter=types.INTERP_CUBIC, mag_filter=types.INTERP_CUBIC,
                               antialias=True, subpixel_scale=False)
            images = fn.crop_mirror_normalize(images, crop=(res, res), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                              mirror=flips, dtype=types.UINT8,
                                              output_layout="CHW")
            return images, labels

        pipe = pipeline()
        pipe.build()
        return pipe

    def _to_torch(self, images) -> torch.Tensor:
        if self.decode_device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = images.as_tensor()
            out = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(np.array(images.as_tensor()))

    def iterate(self, plan_indices: np.ndarray, plan_flips: np.ndarray) -> Iterator[dict]:
        """Yield {"image" uint8 (B,3,R,R) (on the GPU with mixed decoding), "label", "indices" (samples
        used), "failed"} for each step of the plan. A batch that DALI fails to decode (a file damaged past
        its header) is decoded again with PIL, which replaces the bad file; the pipeline restarts after it."""
        from .pil import decode_batch

        start, unexplained = 0, 0
        while start < len(plan_indices):
            self._feed, self._used = (plan_indices[start:], plan_flips[start:]), {}
            pipe = self._build()
            step = start
            try:
                while step < len(plan_indices):
                    try:
                        images, labels = pipe.run()
                    except StopIteration:
                        break
                    except CorruptImageError:  # raised by the source callback (on_corrupt="error"), passed through
                        raise
                    except Exception as error:  # DALI operator errors arrive as RuntimeError
                        message = str(error).splitlines()[0] if str(error) else type(error).__name__
                        log.warning("DALI failed on batch %d (%s); decoding it with PIL", step, message)
                        batch = decode_batch(self.index, plan_indices[step], plan_flips[step], self.res, self.on_corrupt)
                        if not batch["failed"]:
                            unexplained += 1
                            if unexplained > 3:
                                raise
                        yield batch
                        step += 1
                        break  # rebuild the pipeline from the next step
                    used, failed = self._used.pop(step - start)
                    yield dict(image=self._to_torch(images),
                               label=torch.from_numpy(np.array(labels.as_tensor()).reshape(-1)),
                               indices=torch.from_numpy(used), failed=failed)
                    step += 1
            finally:
                del pipe
            if step == start:  # no progress: avoid spinning
                raise RuntimeError(f"DALI pipeline produced no batch at step {step}")
            start = step
