"""engine.data: built-in set, ADM crop, DALI CPU decode against PIL, corrupt files, rank sharding,
exact resume, webdataset shards, configuration errors. CPU only, small images."""
from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import CorruptImageError, DataConfig, build_index, build_loader, make_builtin_dataset
from engine.data.builtin import class_names
from engine.data.dali import dali_available
from engine.data.transforms import adm_geometry, center_crop_arr, decode_pil

HAVE_DALI, NO_DALI_REASON = dali_available()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason=f"DALI not usable: {NO_DALI_REASON}")
DECODERS = ["pil", pytest.param("dali", marks=needs_dali)]

CLASSES, PER_CLASS, SIZE = 10, 12, 64


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("builtin"))
    make_builtin_dataset(root, num_classes=CLASSES, images_per_class=PER_CLASS, resolution=SIZE, seed=0)
    return root


def cfg_for(root, **kw):
    base = dict(source="folder", root=root, resolution=32, batch_size=8, num_workers=0, num_threads=2, seed=3,
                cache_dir=os.path.join(root, ".cache_test"))
    base.update(kw)
    return DataConfig(**base)


def collect(loader, steps=None):
    out = []
    for batch in loader:
        out.append({k: v.clone() if torch.is_tensor(v) else list(v) for k, v in batch.items()})
        if steps is not None and len(out) == steps:
            break
    return out


# ---- built-in set ----------------------------------------------------------------------------------------

def test_builtin_dataset_files_classes_and_idempotence(builtin_root, tmp_path):
    names = class_names(CLASSES)
    assert sorted(os.listdir(builtin_root)) == sorted(names + ["manifest.json", ".lock"])
    hue_features, images = [], {}
    for name in names:
        files = sorted(os.listdir(os.path.join(builtin_root, name)))
        assert len(files) == PER_CLASS and all(f.endswith(".jpg") for f in files)
        features = []
        for f in files:
            with Image.open(os.path.join(builtin_root, name, f)) as image:
                assert image.format == "JPEG" and image.size == (SIZE, SIZE)
                image.load()  # decodes completely
                images.setdefault(name, []).append(np.asarray(image.convert("RGB"), np.float32))
                hsv = np.asarray(image.convert("HSV"), np.float32) / 255
            foreground = (hsv[..., 1] > 0.55) & (hsv[..., 2] > 0.6)
            hist = np.histogram(hsv[..., 0][foreground], bins=24, range=(0, 1))[0].astype(np.float64)
            features.append(hist / max(hist.sum(), 1))
        hue_features.append(features)

    # Distinct classes: a nearest-centroid classifier on the foreground hue histogram, fit on half of
    # each class and tested on the other half, is far above chance (10%); measured 0.90 at seed 0.
    half = PER_CLASS // 2
    centroids = np.stack([np.mean(f[:half], 0) for f in hue_features])
    test = np.stack([x for f in hue_features for x in f[half:]])
    truth = np.repeat(np.arange(CLASSES), PER_CLASS - half)
    accuracy = (np.argmin(((test[:, None] - centroids[None]) ** 2).sum(-1), 1) == truth).mean()
    assert accuracy >= 0.8, f"classes not distinct enough: nearest-centroid accuracy {accuracy:.2f}"
    # and the pattern families differ in structure: stripe orientation shows in the gradients
    def gradient_ratio(name):
        a = np.stack(images[name]).mean(-1)
        return np.abs(np.diff(a, axis=1)).mean() / np.abs(np.diff(a, axis=2)).mean()  # d/dy over d/dx
    assert gradient_ratio(names[3]) > 3 and gradient_ratio(names[4]) < 1 / 3  # hstripes, vstripes

    # Idempotent: a second call rewrites nothing; other parameters regenerate.
    some = os.path.join(builtin_root, names[0], sorted(os.listdir(os.path.join(builtin_root, names[0])))[0])
    mtime = os.stat(some).st_mtime_ns
    manifest = make_builtin_dataset(builtin_root, num_classes=CLASSES, images_per_class=PER_CLASS, resolution=SIZE)
    assert os.stat(some).st_mtime_ns == mtime and len(manifest["files"]) == CLASSES * PER_CLASS

    other = str(tmp_path / "bi")
    make_builtin_dataset(other, num_classes=3, images_per_class=2, resolution=16)
    os.remove(os.path.join(other, class_names(3)[1], os.listdir(os.path.join(other, class_names(3)[1]))[0]))
    manifest = make_builtin_dataset(other, num_classes=3, images_per_class=2, resolution=16)  # repairs
    assert all(os.path.exists(os.path.join(other, f)) for f in manifest["files"])
    manifest = make_builtin_dataset(other, num_classes=2, images_per_class=3, resolution=16)
    assert sorted(d for d in os.listdir(other) if not d.startswith(".") and d != "manifest.json") == class_names(2)
    assert len(manifest["files"]) == 6


def test_builtin_files_do_not_depend_on_the_number_of_workers(tmp_path):
    """Classes are written in parallel; each has its own random stream, so the bytes are the same."""
    sets = [make_builtin_dataset(str(tmp_path / f"w{w}"), num_classes=5, images_per_class=3, resolution=24, seed=7,
                                 workers=w) for w in (1, 3)]
    assert sets[0]["files"] == sets[1]["files"] and len(sets[0]["files"]) == 15
    for rel in sets[0]["files"]:
        assert (tmp_path / "w1" / rel).read_bytes() == (tmp_path / "w3" / rel).read_bytes(), rel


# ---- ADM centre crop -------------------------------------------------------------------------------------

@pytest.mark.parametrize("w,h,res,expected", [
    (500, 375, 256, (0, 341, 256, 42, 0)),   # ImageNet-like: bicubic only
    (375, 500, 256, (0, 256, 341, 0, 42)),
    (1024, 768, 256, (1, 341, 256, 42, 0)),  # one box halving to 512x384 first
    (1030, 2049, 256, (2, 256, 510, 0, 127)),  # floor halvings 515x1024, 257x512; then x256/257
    (64, 64, 32, (1, 32, 32, 0, 0)),
    (100, 50, 64, (0, 128, 64, 32, 0)),      # upscaling
])
def test_adm_geometry_table(w, h, res, expected):
    assert adm_geometry(w, h, res) == expected


def test_center_crop_arr_against_direct_formula():
    rng = np.random.default_rng()
    # No resampling (min side == res): the crop is a plain slice at ((w-res)//2, (h-res)//2).
    for w, h in [(40, 32), (32, 45), (32, 32), (77, 32)]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = center_crop_arr(Image.fromarray(arr), 32)
        top, left = (h - 32) // 2, (w - 32) // 2
        np.testing.assert_array_equal(out, arr[top:top + 32, left:left + 32])
    # Two box halvings of a 4r x 4r image, then identity bicubic: 4x4 block means. PIL rounds to uint8
    # after each horizontal and each vertical pass (4 roundings of at most 0.5 each), so each value may
    # differ from the exact mean by at most 2.
    r = 16
    arr = rng.integers(0, 256, (4 * r, 4 * r, 3), dtype=np.uint8)
    direct = arr.astype(np.float64).reshape(r, 4, r, 4, 3).mean((1, 3))
    out = center_crop_arr(Image.fromarray(arr), r).astype(np.float64)
    assert out.shape == (r, r, 3)
    assert np.abs(out - direct).max() <= 2.0
    # Flip and layout of the decode path.
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    chw = decode_pil(buf.getvalue(), r, flip=True)
    np.testing.assert_array_equal(chw, out.astype(np.uint8)[:, ::-1].transpose(2, 0, 1))


# ---- DALI CPU decode against PIL decode ------------------------------------------------------------------

@needs_dali
@pytest.mark.parametrize("resolution,mean_tol,max_tol,p99_tol", [
    # No box halving (min side 64 < 2*48): same geometry and bicubic resampling; measured mean 0.19, max 4.
    (48, 0.5, 8, 3),
    # Box halving 64 -> 32 in ADM, one antialiased cubic resize in DALI; measured mean ~1.9, p99 ~11.
    (32, 3.0, 64, 16),
    # Identity size: the decode alone, bit-identical (both libjpeg-turbo).
    (64, 0.0, 0, 0),
])
def test_dali_cpu_decode_matches_pil(builtin_root, resolution, mean_tol, max_tol, p99_tol):
    cfgs = [cfg_for(builtin_root, resolution=resolution, decoder=d, dali_device="cpu") for d in ("dali", "pil")]
    dali_loader, pil_loader = (build_loader(c, 0, 1, "cpu") for c in cfgs)
    assert dali_loader.backend.name == "dali" and pil_loader.backend.name == "pil"
    dali_batches, pil_batches = collect(dali_loader, 4), collect(pil_loader, 4)
    for a, b in zip(dali_batches, pil_batches):
        assert a["image"].dtype == torch.uint8 and a["image"].shape == (8, 3, resolution, resolution)
        torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)
    diff = torch.cat([(a["image"].int() - b["image"].int()).abs().flatten()
                      for a, b in zip(dali_batches, pil_batches)]).double()
    assert diff.mean() <= mean_tol and diff.max() <= max_tol and torch.quantile(diff, 0.99) <= p99_tol, \
        f"DALI vs PIL at {resolution}: mean {diff.mean():.3f} max {diff.max():.0f} p99 {torch.quantile(diff, 0.99):.0f}"


@needs_dali
def test_dali_flips_match_pil_on_non_square_jpegs(tmp_path):
    # Photos of other aspect ratios: exercises the per-image resize size and crop offsets.
    rng = np.random.default_rng()
    for c in range(2):
        os.makedirs(tmp_path / f"c{c}")
        for i, (w, h) in enumerate([(90, 60), (61, 97), (70, 70), (123, 41)]):
            small = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.BICUBIC).save(tmp_path / f"c{c}" / f"{i}.jpg", quality=95)
    outs = {}
    for d in ("dali", "pil"):
        cfg = cfg_for(str(tmp_path), resolution=40, batch_size=4, decoder=d, dali_device="cpu", random_flip=True)
        outs[d] = collect(build_loader(cfg, 0, 1, "cpu"))
    diff = torch.cat([(a["image"].int() - b["image"].int()).abs().flatten()
                      for a, b in zip(outs["dali"], outs["pil"])]).double()
    assert diff.mean() <= 0.5 and diff.max() <= 8, f"mean {diff.mean():.3f} max {diff.max():.0f}"


# ---- corrupt and missing files ---------------------------------------------------------------------------

def _corrupt_tree(builtin_root, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(builtin_root, root, ignore=shutil.ignore_patterns(".*", "manifest.json"))
    good = os.path.join(root, class_names(CLASSES)[2], sorted(os.listdir(root / class_names(CLASSES)[2]))[0])
    truncated = os.path.join(root, class_names(CLASSES)[2], "truncated.jpg")
    data = open(good, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    text = os.path.join(root, class_names(CLASSES)[5], "notes.jpg")
    open(text, "w").write("this is not an image\n")
    return str(root), truncated, text


@pytest.mark.parametrize("decoder", DECODERS)
def test_corrupt_files_are_skipped_counted_and_named(builtin_root, tmp_path, caplog, decoder):
    root, truncated, text = _corrupt_tree(builtin_root, tmp_path)
    caplog.set_level(logging.WARNING, logger="engine.data")
    loader = build_loader(cfg_for(root, decoder=decoder, dali_device="cpu"), 0, 1, "cpu")
    assert loader.skipped == 2
    assert len(loader.index) == CLASSES * PER_CLASS
    warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert any(truncated in m for m in warned) and any(text in m for m in warned)
    batches = collect(loader)
    assert len(batches) == len(loader) == CLASSES * PER_CLASS // 8
    # the cached index is reused by a second loader: same result, warned again by name
    caplog.clear()
    again = build_loader(cfg_for(root, decoder=decoder, dali_device="cpu"), 0, 1, "cpu")
    assert again.skipped == 2 and sum(truncated in r.getMessage() for r in caplog.records) == 1

    with pytest.raises(CorruptImageError) as error:  # one error naming every bad file, with its reason
        build_loader(cfg_for(root, decoder=decoder, on_corrupt="error", cache_dir=str(tmp_path / "c2")), 0, 1, "cpu")
    message = str(error.value)
    assert message.startswith("2 corrupt or missing images (data.on_corrupt='error'") and "\n" not in message
    assert f"{truncated}: truncated JPEG" in message and f"{text}: not a readable image" in message


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 8 x 8 PNG whose header (IHDR) claims width x height: a few hundred bytes that a decoder
    would expand into width * height pixels."""
    import struct
    import zlib

    out = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("decoder", DECODERS)
def test_decompression_bomb_is_refused_by_name_undecoded(builtin_root, tmp_path, caplog, decoder):
    """Two tiny PNGs whose headers claim 10000 x 10000 (above PIL's cap, where PIL only warns) and
    30000 x 30000 pixels (above twice the cap, where PIL raises): both refused at indexing as
    decompression bombs, by name, without decoding; in error mode named in one error. A bomb
    written after indexing is refused on the decode path too (PIL's and DALI's)."""
    import warnings

    from engine.data.index import check_image, max_image_pixels

    assert max_image_pixels() == Image.MAX_IMAGE_PIXELS < 10000 * 10000
    root = tmp_path / "tree"
    shutil.copytree(builtin_root, root, ignore=shutil.ignore_patterns(".*", "manifest.json"))
    bombs = [str(root / class_names(CLASSES)[1] / "bomb_10k.png"), str(root / class_names(CLASSES)[4] / "bomb_30k.png")]
    for path, side in zip(bombs, (10000, 30000)):
        open(path, "wb").write(_png_claiming(side, side))
        assert os.path.getsize(path) < 200
    caplog.set_level(logging.WARNING, logger="engine.data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's own warning at open
        started = time.perf_counter()
        loader = build_loader(cfg_for(str(root), decoder=decoder, dali_device="cpu", validate="full"), 0, 1, "cpu")
        assert time.perf_counter() - started < 5  # nothing decoded: 10^8 and 9 x 10^8 pixels would take longer
        assert loader.skipped == 2 and len(loader.index) == CLASSES * PER_CLASS
        for path, side in zip(bombs, (10000, 30000)):
            warned = [r.getMessage() for r in caplog.records if path in r.getMessage()]
            assert len(warned) == 1 and "decompression bomb" in warned[0], warned
        assert f"claims 10000x10000 = 100000000 pixels, above the cap of {Image.MAX_IMAGE_PIXELS}" in caplog.text
        with pytest.raises(CorruptImageError, match=r"^2 corrupt or missing images .*bomb_10k.png: decompression bomb"
                                                     r".*bomb_30k.png: decompression bomb"):
            build_loader(cfg_for(str(root), on_corrupt="error", cache_dir=str(tmp_path / "c2")), 0, 1, "cpu")
        for side in (10000, 30000):
            with pytest.raises(ValueError, match="decompression bomb"):
                check_image(_png_claiming(side, side), full=True)
            with pytest.raises(ValueError, match="decompression bomb"):
                decode_pil(_png_claiming(side, side), 32)
        # written after indexing: the decoder refuses it and a readable sample stands in
        sample = loader.plan(0)[0][0][1]
        victim = loader.index.paths[sample]
        open(victim, "wb").write(_png_claiming(10000, 10000))
        loader.index.sizes[sample] = os.path.getsize(victim)  # as if replaced by one of the indexed size
        caplog.clear()
        assert len(collect(loader, 1)) == 1
        assert any(victim in r.getMessage() and "decompression bomb" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("decoder", DECODERS)
def test_file_broken_after_indexing_is_replaced_and_counted(builtin_root, tmp_path, caplog, decoder):
    root, _, _ = _corrupt_tree(builtin_root, tmp_path)
    caplog.set_level(logging.WARNING, logger="engine.data")
    loader = build_loader(cfg_for(root, decoder=decoder, dali_device="cpu"), 0, 1, "cpu")
    first_indices = loader.plan(0)[0][0]
    victim = loader.index.paths[first_indices[3]]
    gone = loader.index.paths[first_indices[5]]
    open(victim, "wb").write(b"\xff\xd8garbage" * 10)  # no longer a JPEG
    os.remove(gone)
    batches = collect(loader)
    assert len(batches) == len(loader)
    assert loader.skipped == 4  # the two from indexing, plus these two
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert victim in messages and gone in messages
    for b in batches:
        assert b["image"].shape == (8, 3, 32, 32)
    # the replacement of slot 3 is the next sample in index order, with its own label
    assert batches[0]["label"][3] == loader.index.labels[first_indices[3] + 1]


# ---- sharding, resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", DECODERS)
def test_two_ranks_see_disjoint_equal_shards(builtin_root, decoder):
    n = CLASSES * PER_CLASS
    loaders = [build_loader(cfg_for(builtin_root, decoder=decoder, dali_device="cpu", batch_size=7), r, 2, "cpu")
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == n // 14
    seen = []
    for loader in loaders:
        indices, _ = loader.plan(0)
        seen.append(set(indices.ravel().tolist()))
        assert indices.shape == (n // 14, 7)
        batches = collect(loader)
        assert len(batches) == n // 14
        labels = torch.cat([b["label"] for b in batches])
        np.testing.assert_array_equal(labels.numpy(), loader.index.labels[indices.ravel()])
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == (n // 14) * 7
    # the global batch of a step does not depend on the world size (same global batch 14)
    single = build_loader(cfg_for(builtin_root, decoder="pil", batch_size=14), 0, 1, "cpu")
    for step in range(len(single)):
        assert set(single.plan(0)[0][step]) == set(loaders[0].plan(0)[0][step]) | set(loaders[1].plan(0)[0][step])
    # another epoch is another permutation
    assert not np.array_equal(loaders[0].plan(0)[0], loaders[0].plan(1)[0])


@pytest.mark.parametrize("decoder", DECODERS)
def test_resume_continues_with_the_same_batches(builtin_root, decoder):
    cfg = cfg_for(builtin_root, decoder=decoder, dali_device="cpu", batch_size=16, random_flip=True)
    reference = build_loader(cfg, 0, 1, "cpu")
    steps = len(reference)
    full = collect(reference) + collect(reference, 4)  # one epoch and 4 steps of the next
    assert reference.state_dict()["epoch"] == 1 and reference.state_dict()["step"] == 4
    for stop in (3, steps, steps + 2):  # mid-epoch, at the epoch end, in the second epoch
        first = build_loader(cfg, 0, 1, "cpu")
        seen = collect(first, stop) if stop <= steps else collect(first) + collect(first, stop - steps)
        state = first.state_dict()
        resumed = build_loader(cfg, 0, 1, "cpu")
        resumed.load_state_dict(state)
        resumed.set_epoch(state["epoch"])  # what a trainer does at the top of its epoch loop: keeps the step
        rest = collect(resumed)
        if not rest or len(seen) + len(rest) < len(full):
            rest += collect(resumed, len(full) - len(seen) - len(rest))
        assert len(seen) + len(rest) >= len(full)
        for k, batch in enumerate((seen + rest)[: len(full)]):
            torch.testing.assert_close(batch["image"], full[k]["image"], rtol=0, atol=0)
            torch.testing.assert_close(batch["label"], full[k]["label"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="global_batch"):
        build_loader(cfg_for(builtin_root, decoder="pil", batch_size=8), 0, 1, "cpu").load_state_dict(
            reference.state_dict())


# ---- webdataset ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", DECODERS)
def test_webdataset_shards(builtin_root, tmp_path, caplog, decoder):
    files = [(c, os.path.join(builtin_root, n, f)) for c, n in enumerate(class_names(CLASSES))
             for f in sorted(os.listdir(os.path.join(builtin_root, n)))[:4]]
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s in range(2):
        with tarfile.open(shard_dir / f"shard-{s:03d}.tar", "w") as tar:
            for k, (label, path) in enumerate(files[s::2]):
                tar.add(path, arcname=f"sample{k:04d}.jpg")
                info = tarfile.TarInfo(f"sample{k:04d}.cls")
                payload = str(label).encode()
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            broken = b"\xff\xd8\xff\xe0 not really a jpeg"
            info = tarfile.TarInfo("broken.jpg")
            info.size = len(broken)
            tar.addfile(info, io.BytesIO(broken))
    caplog.set_level(logging.WARNING, logger="engine.data")
    cfg = cfg_for(str(shard_dir), source="webdataset", decoder=decoder, dali_device="cpu", batch_size=5, resolution=48,
                  random_flip=False, shuffle=False)
    loader = build_loader(cfg, 0, 1, "cpu")
    assert len(loader.index) == len(files) and loader.skipped == 2 and loader.num_classes == CLASSES
    assert "broken.jpg" in caplog.text
    with pytest.raises(CorruptImageError, match=r"^2 corrupt or missing images .*shard-000.tar/broken.jpg: .*"
                                                 r"shard-001.tar/broken.jpg: "):
        build_loader(cfg_for(str(shard_dir), source="webdataset", on_corrupt="error"), 0, 1, "cpu")
    batches = collect(loader)
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    order = files[0::2] + files[1::2]  # shard 0 then shard 1, member order
    for i in range(len(images)):
        label, path = order[i]
        assert int(labels[i]) == label
        expected = torch.from_numpy(decode_pil(open(path, "rb").read(), 48))
        assert (images[i].int() - expected.int()).abs().double().mean() <= 0.5  # as in the DALI test at 48


# ---- configuration ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,allowed", [
    ("source", "imagenet", "builtin"), ("decoder", "nvjpeg", "dali"), ("dali_device", "gpu", "mixed"),
    ("on_corrupt", "ignore", "skip"), ("resolution", 4, ">= 8"), ("batch_size", 0, ">= 1"),
    ("resolution", 256.0, "integer"), ("random_flip", "yes", "true or false"), ("num_classes", 0, "positive"),
    ("center_crop", "random", "adm"),
])
def test_config_errors_name_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ValueError) as info:
        DataConfig(**{key: value})
    assert key in str(info.value) and repr(value) in str(info.value) and allowed in str(info.value)


def test_config_unknown_key_and_impossible_combinations(builtin_root):
    with pytest.raises(ValueError, match="resolutoin: not a known key"):
        DataConfig.from_dict(dict(resolutoin=256))
    assert DataConfig.from_dict(dict(resolution=128)).resolution == 128
    with pytest.raises(ValueError, match="latents_root"):
        DataConfig(source="latent_shards", root=builtin_root)
    with pytest.raises(ValueError, match="batch_size=1000"):
        build_loader(cfg_for(builtin_root, batch_size=1000, decoder="pil"), 0, 1, "cpu")
    with pytest.raises(ValueError, match="num_classes=3"):
        build_index(cfg_for(builtin_root, num_classes=3))
    if HAVE_DALI:
        with pytest.raises(ValueError, match="dali_device='mixed'"):
            build_loader(cfg_for(builtin_root, decoder="dali", dali_device="mixed"), 0, 1, "cpu")


@needs_dali
def test_dali_decode_error_falls_back_to_pil_for_that_batch(builtin_root, monkeypatch, caplog):
    from engine.data.dali import DaliBackend

    cfg = cfg_for(builtin_root, decoder="dali", dali_device="cpu", resolution=64)  # 64: DALI == PIL exactly
    reference = collect(build_loader(cfg, 0, 1, "cpu"), 6)
    real_build, calls = DaliBackend._build, {"n": 0}

    def flaky_build(self):
        pipe = real_build(self)
        real_run = pipe.run

        def run():
            calls["n"] += 1
            if calls["n"] == 3:  # the third batch fails inside DALI
                raise RuntimeError("nvimgcodec: simulated decode failure")
            return real_run()
        pipe.run = run
        return pipe

    monkeypatch.setattr(DaliBackend, "_build", flaky_build)
    caplog.set_level(logging.WARNING, logger="engine.data")
    got = collect(build_loader(cfg, 0, 1, "cpu"), 6)
    assert "simulated decode failure" in caplog.text
    for a, b in zip(got, reference):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_error_mode_names_a_file_broken_after_indexing(builtin_root, tmp_path, decoder):
    root = str(tmp_path / "tree")
    shutil.copytree(builtin_root, root, ignore=shutil.ignore_patterns(".*", "manifest.json"))
    loader = build_loader(cfg_for(root, decoder=decoder, dali_device="cpu", on_corrupt="error"), 0, 1, "cpu")
    victims = [loader.index.paths[i] for i in loader.plan(0)[0][1][[2, 5]]]  # two files of the second batch
    for victim in victims:
        open(victim, "w").write("not an image any more")
    with pytest.raises(CorruptImageError, match="^2 corrupt or missing images") as error:
        collect(loader)
    assert all(f"{victim}: " in str(error.value) for victim in victims), str(error.value)


def test_header_check_of_large_files_reads_head_and_tail(tmp_path):
    from engine.data.index import HEAD_BYTES, check_file_range

    noise = np.random.default_rng().integers(0, 256, (700, 900, 3), dtype=np.uint8)
    good = tmp_path / "big.jpg"
    Image.fromarray(noise).save(good, quality=95)
    data = good.read_bytes()
    assert len(data) > 2 * HEAD_BYTES  # the head/tail path, not the whole-file path
    assert check_file_range(str(good), 0, len(data), full=False) == (900, 700, "")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) - 1000])
    w, h, reason = check_file_range(str(cut), 0, len(data) - 1000, full=False)
    assert "truncated JPEG" in reason
    # the same image inside a bigger file (as in a tar shard)
    packed = tmp_path / "packed.bin"
    packed.write_bytes(b"x" * 1234 + data + b"y" * 999)
    assert check_file_range(str(packed), 1234, len(data), full=True) == (900, 700, "")
    assert check_file_range(str(tmp_path / "absent.jpg"), 0, 10, full=False)[2] == "missing file"


def test_webdataset_index_is_cached_per_shard(builtin_root, tmp_path, monkeypatch):
    import engine.data.index as index_module

    shard = tmp_path / "one.tar"
    with tarfile.open(shard, "w") as tar:
        for k, name in enumerate(class_names(CLASSES)[:3]):
            tar.add(os.path.join(builtin_root, name, sorted(os.listdir(os.path.join(builtin_root, name)))[0]),
                    arcname=f"s{k}.jpg")
            info = tarfile.TarInfo(f"s{k}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(str(k).encode()))
    cfg = cfg_for(str(tmp_path), source="webdataset", batch_size=1, decoder="pil")
    first = build_index(cfg)
    monkeypatch.setattr(index_module, "_index_shard", lambda *a: pytest.fail("shard indexed again"))
    second = build_index(cfg)
    assert first.keys == second.keys == ["one.tar/s0.jpg", "one.tar/s1.jpg", "one.tar/s2.jpg"]
    np.testing.assert_array_equal(second.labels, [0, 1, 2])
    np.testing.assert_array_equal(first.offsets, second.offsets)


def test_adm_geometry_batch_matches_scalar():
    from engine.data.transforms import adm_geometry_batch

    rng = np.random.default_rng()
    widths, heights = rng.integers(8, 3000, 500), rng.integers(8, 3000, 500)
    for res in (32, 256, 512):
        batch = adm_geometry_batch(widths, heights, res)
        for w, h, row in zip(widths.tolist(), heights.tolist(), batch.tolist()):
            assert tuple(row) == adm_geometry(w, h, res), (w, h, res)


def test_pil_workers_give_the_same_batches_as_the_main_process(builtin_root):
    batches = [collect(build_loader(cfg_for(builtin_root, decoder="pil", num_workers=w), 0, 1, "cpu"), 5)
               for w in (0, 2)]
    for a, b in zip(*batches):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)


@pytest.mark.parametrize("device, dali_device, expected", [
    ("cpu", "auto", "pil"), ("cuda", "cpu", "pil"), pytest.param("cuda", "auto", "dali", marks=needs_dali),
    pytest.param("cuda", "mixed", "dali", marks=needs_dali)])
def test_auto_decoder_takes_dali_for_gpu_decoding_only(builtin_root, device, dali_device, expected):
    from engine.data.loader import _choose_decoder

    cfg = DataConfig(source="builtin", root=builtin_root, decoder="auto", dali_device=dali_device)
    assert _choose_decoder(cfg, torch.device(device)) == expected
    assert _choose_decoder(DataConfig(source="builtin", root=builtin_root, decoder="pil"), torch.device(device)) == "pil"
