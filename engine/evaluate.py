"""FID, sFID, Inception Score, precision and recall of generated images against a reference batch, as
the ADM evaluator (guided-diffusion `evaluations/evaluator.py`, the one REPA, REG, SiT and DiT report
with) defines them, on torch-fidelity's port of the TF Inception-v3 graph it uses.

    python -m engine.evaluate --samples OUT/samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    deepspeed --num_gpus 8 --module engine.evaluate --samples OUT/samples.npz --ref REF.npz
    torchrun --nproc_per_node 8 -m engine.evaluate --samples ... --ref ...

Both files hold `arr_0`, uint8 (N, H, W, 3) images (what `engine.sample` writes); ADM's reference
batches also carry the reference statistics `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (mixed_6/conv),
which are then used as ADM uses them. Definitions (ADM's):

- FID: Frechet distance of the 2048-d pool_3 features; sFID: the same on the first 7 channels of
  mixed_6/conv (the 1x1 branch of Mixed_6d, 17 x 17 x 7 = 2023 values, flattened height, width,
  channel as TF lays them out, so our statistics compare with the reference's `mu_s`, `sigma_s`);
- Inception Score: softmax of the unbiased 1008-way logits, in consecutive splits of 5000 images
  (10 splits at 50K; one split below 5000 images);
- precision / recall (Kynkaanniemi et al. 2019): k = 3 nearest-neighbour balls of pool_3 features;
  precision is the fraction of samples inside the reference manifold, recall the converse.

Feature extraction is spread over the ranks the launcher starts (batch b on rank b % world), each
batch's features are written to `OUT/inception_parts/<name>/` (`engine.parts`: a cache, deleted where
it was made from another file, other weights or batch size) so a rerun after a crash continues, and
the statistics of each set (mu, sigma, mu_s, sigma_s, the pool_3 features and the Inception Score)
go to `OUT/<name>_inception.npz`, so a second comparison against either set is instant. The metrics
are printed and written to `OUT/evaluation.json` (OUT: `--out`, default the samples' directory).

Inception weights: `--inception-weights PATH`, else torch-fidelity's file in the torch hub cache;
nothing is downloaded. `--random-inception` replaces them with random weights, for tests only.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import struct
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from engine.atomic_files import write_atomic
from engine.distributed import command_process, run_on_main
from engine.images import batch_labels, generate
from engine.metrics_library import default_inception_weights, resolve_inception_weights
from engine.parts import open_parts, parts_to_make, read_parts, write_part

log = logging.getLogger("engine.evaluate")

EXTRACTION_TIMEOUT_S = 2 * 3600
IS_SPLIT_SIZE = 5000          # ADM: consecutive splits of 5000 images
PR_NEIGHBOURS = 3             # ADM's ManifoldEstimator nhood_sizes=(3,)
SPATIAL_CHANNELS = 7          # ADM: mixed_6/conv[..., :7]
RANDOM_WARNING = ("RANDOM INCEPTION WEIGHTS (--random-inception, for tests only): these numbers are NOT FID, "
                  "sFID, IS, precision or recall and compare with nothing published")
FEATURE_KEYS = ("pool", "spatial", "logits")
# The random test network sees 75 px (Inception-v3's smallest input; 16x cheaper than 299 px, which
# takes ~1 s an image on a CPU core): mixed_6/conv is then 3 x 3 x 7 = 63 values instead of 2023.
RANDOM_INPUT_SIZE = 75


# ----------------------------------------------------------------------------------------------
# The Inception network (torch-fidelity's port of the TF graph ADM uses)
# ----------------------------------------------------------------------------------------------

def _torch_fidelity():
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as module
    except ImportError as error:
        raise ImportError(f"Inception metrics need torch-fidelity ({error}); pip install -e \".[eval]\"") from None
    return module


class InceptionFeatures(nn.Module):
    """uint8 (B, H, W, 3) images -> {"pool": (B, 2048) pool_3, "spatial": (B, 2023) mixed_6/conv[..., :7]
    in TF's (H, W, C) order, "logits": (B, 1008) unbiased logits}, all float32. The network resizes
    to 299 px as the TF graph does (torch-fidelity's TF-compatible bilinear resize). `random`: seeded
    random weights at `random_size` px, for tests only."""

    def __init__(self, weights: str | None = None, random: bool = False, random_size: int = RANDOM_INPUT_SIZE):
        super().__init__()
        tf = _torch_fidelity()
        features = ["2048", "logits_unbiased"]
        if random:
            class RandomInception(tf.FeatureExtractorInceptionV3):
                INPUT_IMAGE_SIZE = random_size

                def load_state_dict(self, state_dict, strict=True, assign=False):
                    return None  # keep the (seeded) random initialisation

            empty = io.BytesIO()
            torch.save({}, empty)
            empty.seek(0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same random network on every rank
                self.net = RandomInception("inception-v3-random", features, feature_extractor_weights_path=empty)
                for module in self.net.modules():  # variance-preserving, so features neither vanish nor explode
                    if isinstance(module, (nn.Conv2d, nn.Linear)):
                        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            self.description = f"random weights at {random_size} px (TEST ONLY)"
        else:
            path = resolve_inception_weights(weights)
            self.net = tf.FeatureExtractorInceptionV3("inception-v3-compat", features,
                                                       feature_extractor_weights_path=path)
            self.description = f"torch-fidelity InceptionV3 (TF 2015-12-05 graph) from {path}"
        self.random = random
        self.weights_id = f"random-{random_size}" if random else f"{os.path.abspath(path)}:{os.path.getsize(path)}"
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
        device = next(self.net.parameters()).device
        pool, logits = self.net(images.to(device).permute(0, 3, 1, 2).contiguous())
        spatial = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (B, 17 * 17 * 7), TF's order
        self._spatial = None
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


# ----------------------------------------------------------------------------------------------
# Metrics (torch-fidelity's where it has ADM's definition)
# ----------------------------------------------------------------------------------------------

def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features in float64, as ADM computes them (np.cov, N - 1)."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"{len(features)} feature vector(s): a covariance needs at least 2")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) (torch-fidelity's, through the
    eigenvalues of sigma1 sigma2)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different shapes: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
                         f"{sigma2.shape}")
    return float(fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                          verbose=False)[KEY_METRIC_FID])


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score: exp(E KL(p(y|x) || p(y))) per consecutive split of `split_size` images,
    averaged (torch-fidelity's computation, unshuffled; its equal splits are ADM's whenever
    split_size divides N, as at 50K)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    logits = torch.as_tensor(np.asarray(logits))
    splits = max(1, math.ceil(len(logits) / split_size))
    return float(isc_features_to_metric(logits, splits=splits, shuffle=False)[KEY_METRIC_ISC_MEAN])


def precision_recall(sample_features, ref_features, k: int = PR_NEIGHBOURS, device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al.): a point is inside a set's manifold when it lies
    within the distance from some member to that member's k-th nearest neighbour (torch-fidelity's)."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    fake = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    real = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    if min(len(fake), len(real)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples and reference images, got "
                         f"{len(fake)} and {len(real)}")
    precision, recall = calculate_precision_recall_part(fake, real, neighborhood=k, batch_size=10000)
    return float(precision), float(recall)


class FeatureStats:
    """What the metrics need of one image set: pool_3 and spatial statistics, the pool_3 features
    (precision/recall) and, for samples, the Inception Score."""

    KEYS = ("mu", "sigma", "mu_s", "sigma_s")

    def __init__(self, mu, sigma, mu_s, sigma_s, pool=None, inception_score=None, num_images=None):
        self.mu, self.sigma, self.mu_s, self.sigma_s = mu, sigma, mu_s, sigma_s
        self.pool, self.inception_score = pool, inception_score
        self.num_images = num_images if num_images is not None else (len(pool) if pool is not None else None)

    @classmethod
    def from_features(cls, features: dict[str, np.ndarray]) -> "FeatureStats":
        mu, sigma = statistics(features["pool"])
        mu_s, sigma_s = statistics(features["spatial"])
        return cls(mu, sigma, mu_s, sigma_s, pool=np.asarray(features["pool"], np.float32),
                   inception_score=inception_score(features["logits"]))

    def save(self, path: str, meta: dict) -> str:
        arrays = {k: getattr(self, k) for k in self.KEYS}
        if self.pool is not None:
            arrays["pool"] = self.pool
        if self.inception_score is not None:
            arrays["inception_score"] = np.float64(self.inception_score)
        arrays["meta"] = np.array(json.dumps(meta))
        return write_atomic(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str) -> tuple["FeatureStats", dict]:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"])) if "meta" in f else {}
            stats = cls(*(f[k] for k in cls.KEYS), pool=f["pool"] if "pool" in f else None,
                        inception_score=float(f["inception_score"]) if "inception_score" in f else None,
                        num_images=meta.get("num_images"))
        return stats, meta


def compute_metrics(samples: FeatureStats, ref: FeatureStats, device=None) -> dict:
    """ADM's numbers for `samples` against `ref`."""
    out = {"inception_score": samples.inception_score,
           "fid": frechet_distance(samples.mu, samples.sigma, ref.mu, ref.sigma),
           "sfid": frechet_distance(samples.mu_s, samples.sigma_s, ref.mu_s, ref.sigma_s)}
    if samples.pool is not None and ref.pool is not None:
        out["precision"], out["recall"] = precision_recall(samples.pool, ref.pool, device=device)
    return out


# ----------------------------------------------------------------------------------------------
# ADM's .npz batches
# ----------------------------------------------------------------------------------------------

class NpzImages:
    """The `arr_0` images of an `.npz`, read in slices: memory-mapped where the entry is stored
    uncompressed (np.savez, engine.sample, ADM's reference batches), else loaded whole."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if "arr_0.npy" not in names:
                    raise ValueError(f"{path} has no arr_0 (it holds {sorted(n[:-4] for n in names)}); expected "
                                     "uint8 (N, H, W, 3) images as arr_0, as engine.sample and ADM write them")
                info = zf.getinfo("arr_0.npy")
            stored = info.compress_type == zipfile.ZIP_STORED
        except zipfile.BadZipFile as error:
            raise ValueError(f"{path} is not an .npz file ({error})") from None
        if stored:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                shape, fortran, dtype = reader[version](f)
                offset = f.tell()
            self._check(shape, dtype, fortran)
            self.images = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
        else:
            with np.load(path) as f:
                images = f["arr_0"]
            self._check(images.shape, images.dtype, False)
            self.images = images

    def _check(self, shape, dtype, fortran) -> None:
        if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise ValueError(f"{self.path}: arr_0 is {np.dtype(dtype)} {tuple(shape)}; expected uint8 (N, H, W, 3)")

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[start:stop]))  # a copy: the map is read-only


def read_reference_statistics(path: str) -> FeatureStats | None:
    """ADM's reference statistics (mu, sigma, mu_s, sigma_s) stored in `path`, or None without them."""
    with np.load(path) as f:
        present = [k for k in FeatureStats.KEYS if k in f]
        if not present:
            return None
        if len(present) != len(FeatureStats.KEYS):
            raise ValueError(f"{path} holds {present} of ADM's statistics {list(FeatureStats.KEYS)}; need all or none")
        return FeatureStats(*(f[k] for k in FeatureStats.KEYS))


def use_stored_statistics(ref: FeatureStats, stored: FeatureStats | None) -> FeatureStats:
    """ADM compares against the statistics stored in a reference batch where it has them (and takes
    only the pool_3 features, for precision/recall, from its images)."""
    if stored is None:
        return ref
    if stored.mu.shape != ref.mu.shape or stored.mu_s.shape != ref.mu_s.shape:
        raise ValueError(f"the reference batch's stored statistics have shapes {stored.mu.shape} / {stored.mu_s.shape}, "
                         f"the Inception features {ref.mu.shape} / {ref.mu_s.shape}")
    return FeatureStats(stored.mu, stored.sigma, stored.mu_s, stored.sigma_s, pool=ref.pool, num_images=ref.num_images)


def write_reference_batch(path: str, images: np.ndarray, stats: FeatureStats | None = None) -> str:
    """An ADM-style reference batch: arr_0 and, with `stats`, mu, sigma, mu_s, sigma_s."""
    arrays = {"arr_0": images}
    if stats is not None:
        arrays.update({k: getattr(stats, k) for k in FeatureStats.KEYS})
    return write_atomic(path, lambda f: np.savez(f, **arrays))


# ----------------------------------------------------------------------------------------------
# Feature extraction over ranks, resumable
# ----------------------------------------------------------------------------------------------

def source_meta(path: str, model: InceptionFeatures, num_images: int, batch_size: int) -> dict:
    st = os.stat(path)
    return {"source": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "num_images": num_images, "batch_size": batch_size, "inception": model.weights_id}


def features_problem(part, rows: int) -> str | None:
    """None when a part holds `rows` rows of every feature; otherwise what it lacks."""
    lacking = [k for k in FEATURE_KEYS if k not in part or len(part[k]) != rows]
    return f"lacks {rows} rows of {', '.join(lacking)}" if lacking else None


def extract_features(images: NpzImages, model: InceptionFeatures, parts_dir: str, batch_size: int, meta: dict,
                     info, progress: bool = True, overwrite: bool = False) -> dict[str, np.ndarray] | None:
    """Features of every image, batch b on rank b % world; each batch written to `parts_dir`, an
    internal cache (engine.parts): a rerun skips the parts that load, and parts made with another
    `meta` (another file, other weights or batch size) are deleted, as with `overwrite`. Rank 0
    returns the features in image order, other ranks None."""
    n = len(images)
    num_batches = math.ceil(n / batch_size)
    rows = lambda b: min(batch_size, n - b * batch_size)  # noqa: E731
    run_on_main(info, lambda: open_parts(parts_dir, meta, stale="delete", overwrite=overwrite))
    parts = parts_to_make(info, parts_dir, num_batches, lambda part, b: features_problem(part, rows(b)))
    todo = parts.mine
    if info.is_main:
        log.info("%s: %d images in %d batches of %d over %d rank(s); %d batches already extracted", meta["source"],
                 n, num_batches, batch_size, info.world_size, num_batches - len(parts.missing))
    bar = None
    if progress and info.is_main and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo) * batch_size, desc="inception features (rank 0)", unit="img", file=sys.stderr)
    for b in todo:
        features = model(images.batch(b * batch_size, b * batch_size + rows(b)))
        write_part(parts_dir, b, **{k: v.cpu().numpy() for k, v in features.items()})
        if bar is not None:
            bar.update(rows(b))
    if bar is not None:
        bar.close()
    if info.world_size > 1:
        dist.barrier(device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if not info.is_main:
        return None
    out = {k: [] for k in FEATURE_KEYS}
    for part in read_parts(parts_dir, num_batches, FEATURE_KEYS):
        for k in FEATURE_KEYS:
            out[k].append(part[k])
    return {k: np.concatenate(v) for k, v in out.items()}


def set_statistics(path: str, model: InceptionFeatures, out_dir: str, batch_size: int, info, overwrite: bool,
                   progress: bool = True) -> FeatureStats:
    """The FeatureStats of the images in `path` (collective): from `OUT/<name>_inception.npz` where it was
    made from this very file with these weights, else extracted (resumably) and written there. Rank 0
    returns them, other ranks None."""
    name = os.path.splitext(os.path.basename(path))[0]
    stats_path = os.path.join(out_dir, f"{name}_inception.npz")
    parts_dir = os.path.join(out_dir, "inception_parts", name)
    images = NpzImages(path)
    meta = source_meta(path, model, len(images), batch_size)

    def cached():
        if overwrite or not os.path.exists(stats_path):
            return None
        try:
            stats, old = FeatureStats.load(stats_path)
        except Exception as error:  # noqa: BLE001 - unreadable cache: recompute
            log.warning("%s is unreadable (%s); recomputing it", stats_path, error)
            return None
        same = {k: old.get(k) for k in ("source", "size", "mtime_ns", "inception")} == \
            {k: meta[k] for k in ("source", "size", "mtime_ns", "inception")}
        return stats if same else None

    box = {}
    if run_on_main(info, lambda: box.setdefault("stats", cached()) is not None):  # only rank 0 holds them
        if info.is_main:
            log.info("%s: statistics from %s", path, stats_path)
        return box.get("stats")
    features = extract_features(images, model, parts_dir, batch_size, meta, info, progress, overwrite)

    def finish():
        box["stats"] = FeatureStats.from_features(features)
        box["stats"].save(stats_path, meta)
        shutil.rmtree(parts_dir, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(parts_dir))  # inception_parts/, once empty
        except OSError:
            pass
        log.info("%s: statistics written to %s", path, stats_path)

    run_on_main(info, finish)
    return box.get("stats")


# ----------------------------------------------------------------------------------------------
# The alignment encoder's quality figure (no Inception weights needed)
# ----------------------------------------------------------------------------------------------

class LinearProbe(nn.Module):
    """A linear classifier on standardised encoder features (multinomial logistic regression, full-batch
    L-BFGS): the encoder the run aligns to has no classifier head of its own."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(len(mean), num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.std)

    @torch.no_grad()
    def accuracy(self, features, labels) -> float:
        features, labels = torch.as_tensor(features), torch.as_tensor(labels)
        return float((self(features).argmax(1) == labels).double().mean()) if len(labels) else float("nan")


def train_linear_probe(features, labels, num_classes: int, steps: int = 100, weight_decay: float = 1e-4,
                       seed: int = 0) -> LinearProbe:
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    probe = LinearProbe(features.mean(0), features.std(0).clamp_min(1e-6), num_classes)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        probe.linear.reset_parameters()
        optimizer = torch.optim.LBFGS(probe.linear.parameters(), lr=1.0, max_iter=steps,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(probe(features), labels) + \
                weight_decay * probe.linear.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return probe.requires_grad_(False).eval()


class EncoderReference:
    """The real images as the alignment encoder sees them: class-token statistics (for the Frechet
    distance), and a linear probe trained on 80% of them (its accuracy on the other 20% is the figure a
    perfect generator would reach)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0):
        features = np.asarray(features, np.float64)
        self.num_images = len(features)
        self.mu, self.sigma = statistics(features)
        order = np.random.default_rng(seed).permutation(len(features))
        held = order[: max(1, len(order) // 5)]
        train = order[len(held):]
        self.probe = train_linear_probe(features[train], labels[train], num_classes, seed=seed)
        self.probe_accuracy = self.probe.accuracy(torch.as_tensor(features[held], dtype=torch.float32),
                                                  torch.as_tensor(labels[held]))

    def metrics(self, features: np.ndarray, labels: np.ndarray) -> dict:
        mu, sigma = statistics(features)
        return {"encoder_fd": frechet_distance(mu, sigma, self.mu, self.sigma),
                "class_accuracy": self.probe.accuracy(torch.as_tensor(np.asarray(features), dtype=torch.float32),
                                                      torch.as_tensor(np.asarray(labels)))}


@torch.no_grad()
def encoder_features(encoder, images: torch.Tensor, device) -> torch.Tensor:
    """The class token of uint8 images, (B, H, W, 3) or (B, 3, H, W), in float32 on the CPU."""
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    return encoder(images.contiguous().to(device))[1].float().cpu()


# ----------------------------------------------------------------------------------------------
# Evaluation during training
# ----------------------------------------------------------------------------------------------

class OnlineEvaluator:
    """The trainer's `eval.*`: at start-up the reference statistics (ADM batch `eval.ref` through
    Inception; the training images through the alignment encoder `encoders[0]`), then `evaluate()` at
    the evaluation steps: the EMA model samples `eval.num_images` images over all ranks (global batch b
    of `eval.batch_size` images, labels i % num_classes, seed `eval.seed + b`, on rank b % world, so the
    images do not depend on the number of ranks), their features are gathered on rank 0 and the
    metrics computed there."""

    def __init__(self, trainer):
        self.trainer, self.cfg = trainer, trainer.cfg.eval
        info, e = trainer.dist, self.cfg
        self.out_dir = os.path.join(trainer.output_dir, "eval")
        if info.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        self.inception, self.ref = None, None
        if e.ref is not None:
            if e.random_inception:
                trainer.monitor.warn(f"eval.random_inception: {RANDOM_WARNING}")
            self.inception = InceptionFeatures(e.inception_weights, random=e.random_inception).to(info.device).eval()
            if info.world_size > 1:
                dist.barrier()  # out_dir exists
            ref = set_statistics(e.ref, self.inception, self.out_dir, e.batch_size, info, overwrite=False,
                                 progress=trainer.cfg.logging.progress_bar)
            self.ref = use_stored_statistics(ref, read_reference_statistics(e.ref)) if info.is_main else None
        self.encoder, self.encoder_ref = None, None
        if e.encoder_metrics:
            self.encoder = trainer.encoders[0]
            self.encoder_ref = self._encoder_reference() if info.is_main else None
            if info.is_main:
                r = self.encoder_ref
                trainer.monitor.info(
                    f"eval: encoder figure in the class-token features of encoders[0] ({trainer.cfg.encoders[0].name}): "
                    f"{r.num_images} real training images; its class accuracy comes from a linear probe trained on "
                    f"80% of them (the encoder has no classifier head), {r.probe_accuracy:.1%} on the other 20%")
        if info.world_size > 1:
            dist.barrier()

    def _encoder_reference(self) -> EncoderReference:
        import dataclasses

        from engine.data import Loader

        t = self.trainer
        data_cfg = dataclasses.replace(t.cfg.data, shuffle=False, random_flip=False)
        loader = Loader(data_cfg, t.loader.index, 0, 1, t.loader.device, t.loader.backend)
        features, labels = [], []
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                features.append(encoder_features(self.encoder, batch["image"], t.device))
                labels.append(batch["label"].cpu())
                if sum(len(f) for f in features) >= self.cfg.real_images:
                    break
        features = torch.cat(features)[: self.cfg.real_images].numpy()
        labels = torch.cat(labels)[: self.cfg.real_images].numpy()
        return EncoderReference(features, labels, t.cfg.model.num_classes, seed=self.cfg.seed)

    def _sampling_cfg(self):
        import dataclasses

        cfg, e = self.trainer.cfg, self.cfg
        return dataclasses.replace(cfg, sample=dataclasses.replace(
            cfg.sample, num_steps=e.num_steps, method=e.method, cfg_scale=e.cfg_scale, batch_size=e.batch_size,
            guidance_low=e.guidance_low, guidance_high=e.guidance_high))

    def sample_features(self, model) -> dict | None:
        """Features of the `eval.num_images` samples of `model` (collective); rank 0 gets them in image
        order with the labels, other ranks None."""
        t, e, info = self.trainer, self.cfg, self.trainer.dist
        cfg = self._sampling_cfg()
        num_batches = math.ceil(e.num_images / e.batch_size)
        mine = []
        devices = [info.device] if info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training RNG streams stay untouched
            for b in range(info.rank, num_batches, info.world_size):
                labels = batch_labels(b, e.batch_size, e.num_images, t.cfg.model.num_classes)
                images = generate(model, t.latent_space, labels, cfg, info.device, seed=e.seed + b)
                out = {"labels": labels.numpy()}
                if self.inception is not None:
                    out.update({k: v.cpu().numpy() for k, v in self.inception(images).items()})
                if self.encoder is not None:
                    out["encoder"] = encoder_features(self.encoder, images, info.device).numpy()
                mine.append((b, out))
        if info.world_size > 1:
            gathered = [None] * info.world_size if info.is_main else None
            dist.gather_object(mine, gathered, dst=0)
            if not info.is_main:
                return None
            mine = [item for part in gathered for item in part]
        mine.sort(key=lambda item: item[0])
        return {k: np.concatenate([out[k] for _, out in mine]) for k in mine[0][1]}

    def metrics(self, features: dict) -> dict:
        out = {}
        if self.ref is not None:
            samples = FeatureStats.from_features(features)
            out.update(compute_metrics(samples, self.ref, device=self.trainer.device))
        if self.encoder_ref is not None:
            out.update(self.encoder_ref.metrics(features["encoder"], features["labels"]))
        return out

    def evaluate(self, model) -> dict | None:
        """Metrics of `model`'s samples (collective); rank 0 returns them, other ranks None."""
        features = self.sample_features(model)
        return None if features is None else self.metrics(features)


def format_quality(metrics: dict) -> str:
    parts = [format_metrics(metrics)] if any(k in metrics for k in ("fid", "inception_score")) else []
    if "encoder_fd" in metrics:
        parts.append(f"encoder FD {metrics['encoder_fd']:.4g}  class accuracy {metrics['class_accuracy']:.1%}")
    return "  ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, help=".npz with arr_0 uint8 (N, H, W, 3) (engine.sample's)")
    parser.add_argument("--ref", required=True, help="reference batch, e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("--out", default=None, help="directory for statistics, parts and evaluation.json "
                                                    "(default: the samples' directory; shared by all ranks)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception batch")
    parser.add_argument("--inception-weights", default=None,
                        help=f"torch-fidelity's Inception weights (default: {default_inception_weights()})")
    parser.add_argument("--random-inception", action="store_true",
                        help="TESTS ONLY: random Inception weights; the numbers then mean nothing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (each rank takes cuda:LOCAL_RANK), cuda:N or cpu")
    parser.add_argument("--overwrite", action="store_true", help="recompute cached statistics and parts")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK wins
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.random_inception and args.inception_weights:
        parser.error("--random-inception and --inception-weights exclude each other")
    for key in ("samples", "ref"):
        if not os.path.isfile(getattr(args, key)):
            parser.error(f"--{key} {getattr(args, key)} does not exist")
    return args


def main(argv=None) -> dict:
    """Every rank extracts its share; rank 0 prints, writes and returns the metrics (others {})."""
    args = parse_args(argv)
    # ranks wait at the barrier for the slowest one's last batch: allow long batches
    with command_process(args.device, local_rank=args.local_rank, timeout_s=EXTRACTION_TIMEOUT_S) as info:
        return _evaluate(args, info)


def _evaluate(args: argparse.Namespace, info) -> dict:
    if args.random_inception and info.is_main:
        log.warning(RANDOM_WARNING)
    model = InceptionFeatures(args.inception_weights, random=args.random_inception).to(info.device).eval()
    out_dir = args.out or os.path.dirname(os.path.abspath(args.samples))
    os.makedirs(out_dir, exist_ok=True)
    progress = not args.no_progress
    ref = set_statistics(args.ref, model, out_dir, args.batch_size, info, args.overwrite, progress)
    stored = read_reference_statistics(args.ref)
    samples = set_statistics(args.samples, model, out_dir, args.batch_size, info, args.overwrite, progress)
    if not info.is_main:
        return {}
    ref = use_stored_statistics(ref, stored)
    metrics = compute_metrics(samples, ref, device=info.device)
    result = {**metrics, "num_samples": samples.num_images, "num_ref": ref.num_images,
              "samples": os.path.abspath(args.samples), "ref": os.path.abspath(args.ref),
              "ref_statistics": "stored in the reference batch" if stored is not None else "computed from arr_0",
              "inception": model.description}
    if args.random_inception:
        result["warning"] = RANDOM_WARNING
    path = os.path.join(out_dir, "evaluation.json")
    write_atomic(path, lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(format_metrics(metrics) + f"  ({samples.num_images} samples vs {ref.num_images} reference images; "
          f"{path})", flush=True)
    if args.random_inception:
        print(RANDOM_WARNING, flush=True)
    result["json"] = path
    return result


def format_metrics(metrics: dict) -> str:
    names = {"inception_score": "IS", "fid": "FID", "sfid": "sFID", "precision": "precision", "recall": "recall"}
    return "  ".join(f"{names[k]} {metrics[k]:.4g}" for k in names if metrics.get(k) is not None)


if __name__ == "__main__":
    main()
