"""engine.data.latent_shards and engine.preprocess: shard write/read round trip, statistics, loading latents
in step with images, resumable multi-rank preprocessing, the CLI. A 4x4 average pool stands in for the
VAE encoder so the latents of an image are known exactly."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from engine.data import CorruptImageError, DataConfig, LatentShards, LatentShardWriter, build_loader, make_builtin_dataset
from engine.models.latents import sample_posterior
from engine.preprocess import main as preprocess_main
from engine.preprocess import preprocess

CLASSES, PER_CLASS = 4, 10


class PoolEncoder:
    """Stand-in latent space: mean = 4x4 average pool of the image in [-1, 1], std = a constant map."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, images: torch.Tensor):
        assert images.dtype == torch.uint8 and images.dim() == 4
        self.calls += 1
        self.images += images.shape[0]
        x = images.float() / 127.5 - 1
        mean = torch.nn.functional.avg_pool2d(x, 4)
        return mean, 0.1 + 0.05 * mean.abs()


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("builtin"))
    make_builtin_dataset(root, num_classes=CLASSES, images_per_class=PER_CLASS, resolution=32)
    return root


def data_cfg(root, **kw):
    base = dict(source="folder", root=root, resolution=32, batch_size=8, num_workers=0, decoder="pil", seed=1)
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3)])
def test_shard_round_trip_and_stats(tmp_path, dtype, tol):
    n, shape = 23, (4, 3, 5)
    keys, labels = [f"k{i}" for i in range(n)], np.arange(n) % 3
    mean = np.random.randn(n, *shape).astype(np.float32)
    std = np.random.rand(n, *shape).astype(np.float32)
    writer = LatentShardWriter(str(tmp_path), keys, labels, shape, dtype=dtype, chunk_size=7)
    assert writer.num_chunks == 4 and writer.chunk_rows(3) == (21, 23)
    for c in (0, 2, 3, 1):
        a, b = writer.chunk_rows(c)
        writer.write_chunk(c, mean[a:b], std[a:b])
    stats = writer.write_stats()

    shards = LatentShards(str(tmp_path))
    assert shards.keys == keys and (shards.labels == labels).all() and shards.shape == shape
    rows = np.array([5, 0, 22, 5, 13])
    flips = np.array([True, False, False, False, True])
    got_mean, got_std = shards.read(rows, flips)
    want_mean, want_std = mean[rows].copy(), std[rows].copy()
    want_mean[flips] = want_mean[flips][..., ::-1]
    want_std[flips] = want_std[flips][..., ::-1]
    assert got_mean.dtype == torch.float32
    torch.testing.assert_close(got_mean, torch.from_numpy(want_mean), atol=tol * 4, rtol=tol)
    torch.testing.assert_close(got_std, torch.from_numpy(want_std), atol=tol, rtol=tol)
    assert list(shards.rows_for(["k3", "nope", "k22"])) == [3, -1, 22]

    # statistics against a direct computation on what was stored
    m = np.load(tmp_path / "mean.npy").astype(np.float64)
    s = np.load(tmp_path / "std.npy").astype(np.float64)
    np.testing.assert_allclose(stats["channel_mean"], m.mean((0, 2, 3)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["posterior_mean_std"], m.std((0, 2, 3)), rtol=1e-7)
    np.testing.assert_allclose(stats["channel_std"], np.sqrt(m.var((0, 2, 3)) + (s ** 2).mean((0, 2, 3))), rtol=1e-7)
    assert json.load(open(tmp_path / "stats.json")) == stats


def test_shard_writer_refuses_bad_input_and_incomplete_reads(tmp_path):
    writer = LatentShardWriter(str(tmp_path), ["a", "b", "c"], [0, 1, 0], (2, 2, 2), chunk_size=2)
    with pytest.raises(ValueError, match="expected"):
        writer.write_chunk(0, np.zeros((3, 2, 2, 2)), np.zeros((3, 2, 2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        writer.write_chunk(0, np.full((2, 2, 2, 2), np.nan), np.zeros((2, 2, 2, 2)))
    writer.write_chunk(0, np.zeros((2, 2, 2, 2)), np.ones((2, 2, 2, 2)))
    with pytest.raises(RuntimeError, match="1 of 2 chunks missing"):
        LatentShards(str(tmp_path))
    with pytest.raises(ValueError, match="other settings"):
        LatentShardWriter(str(tmp_path), ["a", "b", "c"], [0, 1, 0], (2, 2, 2), chunk_size=3)
    with pytest.raises(FileNotFoundError, match="preprocess"):
        LatentShards(str(tmp_path / "nothing"))


def test_sample_posterior_is_mean_plus_std_eps():
    mean, std = torch.randn(3, 4, 2, 2), torch.rand(3, 4, 2, 2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    eps = torch.randn(mean.shape, generator=g2)
    torch.testing.assert_close(sample_posterior(mean, std, g1), mean + std * eps)
    draws = torch.stack([sample_posterior(mean, std) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), mean, atol=0.1, rtol=0)
    torch.testing.assert_close(draws.std(0), std, atol=0.1, rtol=0.1)


def test_preprocess_resumes_and_splits_across_ranks(builtin_root, tmp_path):
    cfg = data_cfg(builtin_root)
    n = CLASSES * PER_CLASS

    one_shot = PoolEncoder()
    full = preprocess(cfg, str(tmp_path / "once"), one_shot, batch_size=6, chunk_size=8, dtype="float32")
    assert full["written"] == [0, 1, 2, 3, 4] and full["stats"] is not None
    assert one_shot.images == n + 1  # every image once, plus the probe of the latent shape

    # Two ranks, run one after the other (no process group): rank 0 stops after one chunk, as if killed.
    out = str(tmp_path / "ranks")
    enc = PoolEncoder()
    r0 = preprocess(cfg, out, enc, batch_size=6, chunk_size=8, dtype="float32", rank=0, world_size=2, max_chunks=1)
    assert r0["written"] == [0] and r0["stats"] is None
    r1 = preprocess(cfg, out, enc, batch_size=6, chunk_size=8, dtype="float32", rank=1, world_size=2)
    assert r1["written"] == [1, 3] and r1["stats"] is None  # only rank 0 writes the statistics
    enc.images = 0
    r0 = preprocess(cfg, out, enc, batch_size=6, chunk_size=8, dtype="float32", rank=0, world_size=2)
    assert r0["written"] == [2, 4] and r0["already_done"] == 1
    assert enc.images == 8 + 8 + 1  # chunks 2 and 4 (the last has 8 rows), plus the probe
    again = preprocess(cfg, out, enc, batch_size=6, chunk_size=8, dtype="float32", rank=0, world_size=2)
    assert again["written"] == [] and again["already_done"] == 3

    a, b = LatentShards(str(tmp_path / "once")), LatentShards(out)
    assert a.keys == b.keys and len(a) == n
    np.testing.assert_array_equal(np.asarray(a.mean), np.asarray(b.mean))
    np.testing.assert_array_equal(np.asarray(a.std), np.asarray(b.std))
    assert a.stats == b.stats and len(a.stats["channel_mean"]) == 3


def test_loader_yields_latents_in_step_with_images(builtin_root, tmp_path):
    out = str(tmp_path / "lat")
    preprocess(data_cfg(builtin_root), out, PoolEncoder(), batch_size=16, chunk_size=16, dtype="float32")
    cfg = data_cfg(builtin_root, source="latent_shards", latents_root=out, random_flip=True)
    loader = build_loader(cfg, 1, 2, "cpu")
    encoder, flipped_any = PoolEncoder(), False
    for batch in loader:
        assert set(batch) == {"image", "label", "latent_mean", "latent_std", "latent_raw", "keys"}
        assert batch["latent_raw"] is True  # raw moments: the trainer applies latent.scale / latent.shift
        rows = LatentShards(out).rows_for(batch["keys"])  # the keys name the samples of this batch
        assert (rows >= 0).all() and (LatentShards(out).labels[rows] == batch["label"].numpy()).all()
        assert batch["latent_mean"].dtype == torch.float32 and batch["latent_mean"].shape == (8, 3, 8, 8)
        # the stored latents of the images in this batch (flipped with them; pooling commutes with flips)
        mean, std = encoder(batch["image"])
        torch.testing.assert_close(batch["latent_mean"], mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(batch["latent_std"], std, atol=1e-6, rtol=0)
        flipped_any = flipped_any or bool(loader.plan(loader.epoch)[1][loader.step - 1].any())
    assert flipped_any

    # an image without a latent is skipped (named) or, in error mode, an error
    first_class = os.path.join(builtin_root, loader.classes[0])
    extra = os.path.join(first_class, "zz_extra.jpg")
    shutil.copy(os.path.join(first_class, sorted(os.listdir(first_class))[0]), extra)
    try:
        loader = build_loader(cfg, 0, 1, "cpu")
        assert loader.skipped == 1 and len(loader.index) == CLASSES * PER_CLASS
        with pytest.raises(CorruptImageError, match="zz_extra.jpg"):
            build_loader(data_cfg(builtin_root, latents_root=out, on_corrupt="error"), 0, 1, "cpu")
    finally:
        os.remove(extra)


def test_nonfinite_latent_rows_are_dropped_or_named(builtin_root, tmp_path, caplog):
    """Planted NaN / inf rows: dropped from their batches (image, label, latents and key together, the
    other samples in step), counted once per key over epochs; in error mode one error names them all."""
    out = str(tmp_path / "lat")
    preprocess(data_cfg(builtin_root), out, PoolEncoder(), batch_size=16, chunk_size=16, dtype="float32")
    shards = LatentShards(out)
    mean, std = (np.load(os.path.join(out, f"{name}.npy"), mmap_mode="r+") for name in ("mean", "std"))
    mean[3, 1, 2, 2], std[17, 0, 0, 0] = np.nan, np.inf
    mean.flush(), std.flush()
    del mean, std
    poisoned = {shards.keys[3], shards.keys[17]}
    cfg = data_cfg(builtin_root, source="latent_shards", latents_root=out, shuffle=False, random_flip=False)
    loader = build_loader(cfg, 0, 1, "cpu")
    encoder = PoolEncoder()
    caplog.set_level("WARNING", logger="engine.data")
    for epoch in range(2):
        batches = collect_batches(loader)
        assert len(batches) == CLASSES * PER_CLASS // 8
        keys = [k for b in batches for k in b["keys"]]
        assert len(keys) == CLASSES * PER_CLASS - 2 and not poisoned & set(keys)
        for batch in batches:
            assert len(batch["image"]) == len(batch["label"]) == len(batch["latent_mean"]) == len(batch["keys"])
            rows = shards.rows_for(batch["keys"])
            assert (shards.labels[rows] == batch["label"].numpy()).all()
            torch.testing.assert_close(batch["latent_mean"], encoder(batch["image"])[0], atol=1e-6, rtol=0)
    assert loader.dropped_nonfinite == 2
    warned = [r.getMessage() for r in caplog.records if "dropping sample" in r.getMessage()]
    assert len(warned) == 2 and f"{shards.keys[17]} (row 17 of {out}): non-finite latent mean or std" in warned[1]
    error_cfg = data_cfg(builtin_root, source="latent_shards", latents_root=out, shuffle=False, random_flip=False,
                         on_corrupt="error", batch_size=20)
    with pytest.raises(CorruptImageError, match=rf"^2 corrupt or missing latents .*{shards.keys[3]} \(row 3 of .*"
                                                rf"{shards.keys[17]} \(row 17 of "):
        collect_batches(build_loader(error_cfg, 0, 1, "cpu"))


def collect_batches(loader):
    return [dict(batch) for batch in loader]


@pytest.mark.parametrize("space", ["identity", "vae", "module"])
def test_preprocess_cli_with_a_real_latent_space(space, builtin_root, tmp_path, monkeypatch):
    """The CLI builds engine.models.latents' latent space: pixel space, a (tiny, random) diffusers VAE
    from a local folder, or a user's autoencoder module. The shards hold its raw posterior, and the
    per-channel statistics of the same run match ones computed directly from the images encoded here
    (fp64 sums over every image and position, with the unit-variance scale and shift they imply)."""
    from engine.data.transforms import decode_pil
    from engine.models.latents import build_latent_space
    from engine.preprocess import latent_config

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    spec, channels, size = "identity", 3, 32
    if space == "vae":
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                            layers_per_block=1)
        vae.save_pretrained(str(tmp_path / "vae"))
        spec, channels, size = str(tmp_path / "vae"), 4, 16
    if space == "module":
        spec, channels, size = "module:tests.engine.toy_autoencoder:build", 4, 16
    out = str(tmp_path / "cli")
    preprocess_main(["--data-root", builtin_root, "--out", out, "--resolution", "32", "--batch-size", "7",
                     "--chunk-size", "16", "--dtype", "float32", "--local_rank=0", "--latent-space", spec])
    shards = LatentShards(out)
    assert len(shards) == CLASSES * PER_CLASS and shards.meta["latent_space"] == spec
    assert shards.mean.shape[1:] == (channels, size, size) and shards.stats is not None
    assert shards.raw and shards.meta["moments"] == "raw" and "latent_scale" not in shards.meta

    # the reference: every image decoded and encoded here, in one batch
    encode_raw = build_latent_space(latent_config(spec)).eval().encode_raw
    images = torch.from_numpy(np.stack([decode_pil(open(os.path.join(builtin_root, key), "rb").read(), 32)
                                        for key in shards.keys]))
    mean, std = (t.double().numpy() for t in encode_raw(images))
    np.testing.assert_allclose(np.asarray(shards.mean), mean, rtol=1e-5, atol=1e-6)  # raw: no scale applied
    np.testing.assert_allclose(np.asarray(shards.std), std, rtol=1e-5, atol=1e-6)
    channel_mean = mean.mean((0, 2, 3))
    channel_std = np.sqrt(mean.var((0, 2, 3)) + (std ** 2).mean((0, 2, 3)))
    np.testing.assert_allclose(shards.stats["channel_mean"], channel_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shards.stats["channel_std"], channel_std, rtol=1e-5)
    np.testing.assert_allclose(shards.stats["posterior_mean_std"], mean.std((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(shards.stats["unit_scale"], 1 / channel_std, rtol=1e-5)
    np.testing.assert_allclose(shards.stats["unit_shift"], -channel_mean / channel_std, rtol=1e-5, atol=1e-6)
    assert json.load(open(os.path.join(out, "stats.json"))) == shards.stats
    if space == "identity":  # pixel space: images in [-1, 1], std 0
        assert np.abs(np.asarray(shards.mean)).max() <= 1.0 and np.asarray(shards.std).max() == 0


def test_preprocess_cli_refuses_the_old_scale_flags(builtin_root, tmp_path, capsys):
    for flag in ("--latent-scale", "--latent-shift"):
        with pytest.raises(SystemExit):
            preprocess_main(["--data-root", builtin_root, "--out", str(tmp_path / "x"), "--latent-space", "identity",
                             flag, "0.18215"])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{flag} 0.18215: not taken any more" in error and "latent.scale / latent.shift" in error, error
    assert not os.path.exists(tmp_path / "x")


def prescaled_format(root: str, scale, shift) -> None:
    """Turn shards written from normalised moments into the format of the earlier engine.preprocess:
    meta.json without "moments", with the baked-in latent_scale / latent_shift."""
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    del meta["moments"]
    meta.update(latent_scale=scale, latent_shift=shift)
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)


def test_raw_shards_normalised_on_read_equal_prescaled_shards(builtin_root, tmp_path):
    """Round trip: raw shards with a per-channel scale / shift applied on read (the latent space's
    normalise, as the trainer does for latent_raw batches) give the moments that shards with the same
    normalisation baked in (the earlier format) load as they always did, batch by batch, flips included."""
    from engine.models.latents import LatentConfig, build_latent_space

    space = build_latent_space(LatentConfig(kind="module", path="tests.engine.toy_autoencoder:build",
                                            scale=[0.5, -2.0, 0.18215, 3.0], shift=[0.1, 0.0, -0.7, 2.5]))
    raw_out, old_out = str(tmp_path / "raw"), str(tmp_path / "old")
    preprocess(data_cfg(builtin_root), raw_out, space.encode_raw, batch_size=16, chunk_size=16, dtype="float32")
    preprocess(data_cfg(builtin_root), old_out, space.encode, batch_size=16, chunk_size=16, dtype="float32")
    prescaled_format(old_out, [0.5, -2.0, 0.18215, 3.0], [0.1, 0.0, -0.7, 2.5])
    assert LatentShards(raw_out).raw and not LatentShards(old_out).raw
    raw_loader, old_loader = (build_loader(data_cfg(builtin_root, latents_root=root, random_flip=True), 0, 1, "cpu")
                              for root in (raw_out, old_out))
    batches = 0
    for raw, old in zip(raw_loader, old_loader):
        assert raw["latent_raw"] is True and old["latent_raw"] is False and raw["keys"] == old["keys"]
        mean, std = space.normalise(raw["latent_mean"], raw["latent_std"])
        torch.testing.assert_close(mean, old["latent_mean"], rtol=1.2e-7, atol=1e-7)  # fp32 rounding
        torch.testing.assert_close(std, old["latent_std"], rtol=1.2e-7, atol=1e-7)
        assert not torch.allclose(raw["latent_mean"], old["latent_mean"])  # the scale is not in the raw shards
        batches += 1
    assert batches == len(raw_loader) == 5


def test_shards_with_an_unknown_moments_format_are_refused(builtin_root, tmp_path):
    out = str(tmp_path / "lat")
    preprocess(data_cfg(builtin_root), out, PoolEncoder(), batch_size=40, chunk_size=40)
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    meta["moments"] = "logvar"
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"meta.json has moments='logvar', .* allowed: 'raw' .*engine.preprocess") as e:
        LatentShards(out)
    assert "\n" not in str(e.value)


def test_preprocess_cli_names_a_missing_vae_folder(builtin_root, tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        preprocess_main(["--data-root", builtin_root, "--out", str(tmp_path / "x"), "--resolution", "32",
                         "--latent-space", str(tmp_path / "no-such-vae")])


def test_latents_of_another_resolution_are_refused(builtin_root, tmp_path):
    out = str(tmp_path / "lat")
    preprocess(data_cfg(builtin_root), out, PoolEncoder(), batch_size=40, chunk_size=40)
    with pytest.raises(ValueError, match="data.resolution=16 .* encoded at 32"):
        build_loader(data_cfg(builtin_root, resolution=16, latents_root=out), 0, 1, "cpu")


def _two_rank_worker(rank, init_file, root, out, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = preprocess(data_cfg(root), out, PoolEncoder(), batch_size=5, chunk_size=6, dtype="float32",
                            rank=rank, world_size=2)
        loader = build_loader(data_cfg(root, source="latent_shards", latents_root=out), rank, 2, "cpu")
        batches = [dict(label=b["label"], mean=b["latent_mean"]) for b in loader]
        torch.save(dict(written=result["written"], stats=result["stats"], batches=batches),
                   os.path.join(results, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_preprocess_and_loader_under_two_gloo_ranks(builtin_root, tmp_path):
    out, results = str(tmp_path / "lat"), str(tmp_path / "results")
    os.makedirs(results)
    torch.multiprocessing.spawn(_two_rank_worker, args=(str(tmp_path / "init"), builtin_root, out, results), nprocs=2)
    r0, r1 = (torch.load(os.path.join(results, f"rank{r}.pt")) for r in range(2))
    assert r0["written"] == [0, 2, 4, 6] and r1["written"] == [1, 3, 5] and r1["stats"] is None
    single = str(tmp_path / "single")
    preprocess(data_cfg(builtin_root), single, PoolEncoder(), batch_size=40, chunk_size=40, dtype="float32")
    a, b = LatentShards(single), LatentShards(out)
    np.testing.assert_array_equal(np.asarray(a.mean), np.asarray(b.mean))
    assert r0["stats"] == a.stats
    # each rank's batches: disjoint halves of the same global batches a single process would see at batch 16
    one = build_loader(data_cfg(builtin_root, source="latent_shards", latents_root=single, batch_size=16), 0, 1, "cpu")
    for step, batch in enumerate(one):
        both = torch.cat([r0["batches"][step]["mean"], r1["batches"][step]["mean"]])
        torch.testing.assert_close(both, batch["latent_mean"], rtol=0, atol=0)
