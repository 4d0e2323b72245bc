"""engine.evaluate: the metrics against closed forms and independent references (SciPy's sqrtm, ADM's
numpy formulas written out here), ADM's .npz batches, and the command line on one and two ranks with
the random test Inception (its numbers mean nothing; the pipeline around them is what is tested)."""
import json
import os

import numpy as np
import pytest
import torch

from engine import evaluate as ev
from engine.metrics_library import INCEPTION_URL, resolve_inception_weights
from tests.engine.trainer_fixtures import run_ranks

pytest.importorskip("torch_fidelity")


def rng(seed):
    return np.random.default_rng(seed)


def random_spd(g, d):
    a = g.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------

def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM evaluator's FIDStatistics.frechet_distance (scipy.linalg.sqrtm)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # ADM passes disp=False (deprecated in SciPy 1.17)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy_sqrtm(_fresh_seed):
    pytest.importorskip("scipy")
    g = rng(_fresh_seed)
    for d in (1, 7, 64):
        mu1, mu2 = g.standard_normal(d), g.standard_normal(d)
        sigma1, sigma2 = random_spd(g, d), random_spd(g, d)  # not commuting
        ours = ev.frechet_distance(mu1, sigma1, mu2, sigma2)
        torch.testing.assert_close(ours, float(adm_frechet_distance(mu1, sigma1, mu2, sigma2)), rtol=1e-7, atol=1e-9)


def test_fid_of_a_set_against_itself_is_zero(_fresh_seed):
    features = rng(_fresh_seed).standard_normal((300, 32)) * 3 + 1
    mu, sigma = ev.statistics(features)
    torch.testing.assert_close(ev.frechet_distance(mu, sigma, mu, sigma), 0.0, rtol=0, atol=1e-9)


def test_fid_between_gaussian_sets_matches_the_closed_form(_fresh_seed):
    """Samples of N(mu1, Q S1 Q^T) and N(mu2, Q S2 Q^T) (same rotation Q, diagonal S): the distance is
    |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)); sampling error at N = 40000, D = 6 is a few 1e-2."""
    g = rng(_fresh_seed)
    d, n = 6, 40_000
    q, _ = np.linalg.qr(g.standard_normal((d, d)))
    s1, s2 = g.uniform(0.5, 2.0, d), g.uniform(0.5, 2.0, d)
    mu1, mu2 = g.standard_normal(d), g.standard_normal(d)
    x1 = mu1 + (g.standard_normal((n, d)) * np.sqrt(s1)) @ q.T
    x2 = mu2 + (g.standard_normal((n, d)) * np.sqrt(s2)) @ q.T
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    measured = ev.frechet_distance(*ev.statistics(x1), *ev.statistics(x2))
    # The mean term dominates the sampling error: |mean1 - mean2|^2 has a standard deviation of about
    # 2 sqrt(dmu^T (C1 + C2) dmu / n) (0.07 for |dmu| ~ 3.5 here, so a fixed 0.06 failed at ~1 sigma);
    # allow five of those plus 0.03 for the covariance term.
    dmu, c = mu1 - mu2, q @ np.diag(s1 + s2) @ q.T
    tolerance = 5 * 2 * np.sqrt(dmu @ c @ dmu / n) + 0.03
    torch.testing.assert_close(measured, float(closed), rtol=0, atol=float(tolerance))
    # and the exact statistics give the closed form exactly
    exact = ev.frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
    torch.testing.assert_close(exact, float(closed), rtol=1e-9, atol=1e-9)


def test_frechet_distance_refuses_mismatched_statistics():
    with pytest.raises(ValueError, match="different shapes"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------

def adm_inception_score(logits, split_size=5000):
    """ADM evaluator's compute_inception_score on softmax(logits)."""
    z = logits - logits.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_of_one_class_is_one(_fresh_seed):
    logits = np.tile(rng(_fresh_seed).standard_normal(1008) * 5, (64, 1))  # every image: the same prediction
    torch.testing.assert_close(ev.inception_score(logits), 1.0, rtol=0, atol=1e-9)


def test_inception_score_of_balanced_confident_classes_is_their_number():
    logits = np.full((1000, 1008), -50.0)
    logits[np.arange(1000), np.arange(1000) % 10] = 50.0
    torch.testing.assert_close(ev.inception_score(logits), 10.0, rtol=1e-9, atol=0)


def test_inception_score_matches_adm_splits(_fresh_seed):
    logits = rng(_fresh_seed).standard_normal((10_000, 1008)) * 3  # two splits of 5000, as ADM splits them
    torch.testing.assert_close(ev.inception_score(logits), adm_inception_score(logits), rtol=1e-9, atol=0)
    small = logits[:700]  # below 5000 images: one split
    torch.testing.assert_close(ev.inception_score(small), adm_inception_score(small), rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------------------------
# Precision and recall
# ----------------------------------------------------------------------------------------------

def adm_precision_recall(ref, samples, k=3):
    """ADM's ManifoldEstimator / evaluate_pr with squared distances, written out in numpy."""
    def sq(a, b):
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0)

    radii_ref = np.partition(sq(ref, ref), k, axis=1)[:, k]
    radii_sam = np.partition(sq(samples, samples), k, axis=1)[:, k]
    precision = (sq(samples, ref) <= radii_ref[None]).any(1).mean()
    recall = (sq(ref, samples) <= radii_sam[None]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_on_constructed_sets(_fresh_seed):
    g = rng(_fresh_seed)
    ref = g.standard_normal((200, 8)).astype(np.float32)
    # samples on top of half the reference points, and as many far away: precision exactly 1/2
    near = ref[:100] + 1e-4 * g.standard_normal((100, 8)).astype(np.float32)
    far = 100 + g.standard_normal((100, 8)).astype(np.float32)
    precision, recall = ev.precision_recall(np.concatenate([near, far]), ref)
    assert precision == 0.5
    assert 0.5 <= recall < 1.0  # the covered half, plus what the near samples' balls reach
    assert ev.precision_recall(ref, ref) == (1.0, 1.0)
    assert ev.precision_recall(far, ref) == (0.0, 0.0)


def test_precision_recall_match_adm(_fresh_seed):
    g = rng(_fresh_seed)
    ref = g.standard_normal((300, 16)).astype(np.float32)
    samples = (1.3 * g.standard_normal((250, 16)) + 0.6).astype(np.float32)  # precision ~0.2, recall ~0.9
    precision, recall = ev.precision_recall(samples, ref)
    ref_p, ref_r = adm_precision_recall(ref.astype(np.float64), samples.astype(np.float64))
    assert 0.05 < ref_p < 0.5 < ref_r < 0.99  # a case that tells the two apart (and their order)
    torch.testing.assert_close(precision, ref_p, rtol=0, atol=1.5 / 250)  # a borderline point may flip in fp32
    torch.testing.assert_close(recall, ref_r, rtol=0, atol=1.5 / 300)


# ----------------------------------------------------------------------------------------------
# ADM's .npz and the statistics files
# ----------------------------------------------------------------------------------------------

def test_adm_npz_round_trip(tmp_path, _fresh_seed):
    g = rng(_fresh_seed)
    images = g.integers(0, 256, (9, 12, 12, 3), dtype=np.uint8)
    stats = ev.FeatureStats(g.standard_normal(5), random_spd(g, 5), g.standard_normal(3), random_spd(g, 3))
    path = ev.write_reference_batch(str(tmp_path / "ref.npz"), images, stats)
    with np.load(path) as f:  # ADM's evaluator reads these keys
        assert sorted(f.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(f["arr_0"], images)
    reader = ev.NpzImages(path)
    assert isinstance(reader.images, np.memmap) and len(reader) == 9
    np.testing.assert_array_equal(reader.batch(2, 7).numpy(), images[2:7])
    back = ev.read_reference_statistics(path)
    for key in ev.FeatureStats.KEYS:
        np.testing.assert_array_equal(getattr(back, key), getattr(stats, key))
    # compressed (np.savez_compressed) is read whole; a batch without statistics has none
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    np.testing.assert_array_equal(ev.NpzImages(str(tmp_path / "compressed.npz")).batch(0, 9).numpy(), images)
    assert ev.read_reference_statistics(str(tmp_path / "compressed.npz")) is None
    # our statistics file: the same keys plus the pool features and the Inception Score
    stats.pool, stats.inception_score = g.standard_normal((9, 5)).astype(np.float32), 3.5
    stats.save(str(tmp_path / "stats.npz"), {"num_images": 9})
    loaded, meta = ev.FeatureStats.load(str(tmp_path / "stats.npz"))
    np.testing.assert_array_equal(loaded.pool, stats.pool)
    assert loaded.inception_score == 3.5 and meta == {"num_images": 9} and loaded.num_images == 9
    np.testing.assert_array_equal(loaded.sigma_s, stats.sigma_s)


def test_npz_errors_name_the_problem(tmp_path):
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 is float32"):
        ev.NpzImages(str(tmp_path / "floats.npz"))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="has no arr_0"):
        ev.NpzImages(str(tmp_path / "other.npz"))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz"):
        ev.NpzImages(str(tmp_path / "text.npz"))


def test_missing_inception_weights_is_one_line_naming_place_and_url(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as error:
        resolve_inception_weights(None)
    message = str(error.value)
    assert "\n" not in message and INCEPTION_URL in message
    assert str(tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in message
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_inception_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        ev.InceptionFeatures()


def test_inception_feature_shapes_at_299_px():
    """ADM's layers: pool_3 2048, mixed_6/conv[..., :7] at 17 x 17 = 2023, 1008 logits; one image."""
    model = ev.InceptionFeatures(random=True, random_size=299)
    out = model(torch.randint(0, 256, (1, 20, 24, 3), dtype=torch.uint8))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (1, 2048), "spatial": (1, 2023),
                                                           "logits": (1, 1008)}
    # the spatial features are the first 7 channels of Mixed_6d's 1x1 branch in (H, W, C) order
    captured = {}
    model.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    again = model(torch.randint(0, 256, (1, 20, 24, 3), dtype=torch.uint8))
    torch.testing.assert_close(again["spatial"], captured["x"][:, :7].permute(0, 2, 3, 1).reshape(1, -1),
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_sets")
    g = np.random.default_rng(7)
    ref = g.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    samples = np.clip(ref[::-1].astype(int) + g.integers(-40, 40, ref.shape), 0, 255).astype(np.uint8)
    np.savez(root / "samples.npz", arr_0=samples, labels=np.arange(8) % 4)
    ev.write_reference_batch(str(root / "ref.npz"), ref)
    return root


def cli(root, out, *extra, samples="samples.npz", ref="ref.npz"):
    return ["--samples", str(root / samples), "--ref", str(root / ref), "--out", str(out),
            "--batch-size", "3", "--random-inception", "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def one_rank(image_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_one")
    return out, ev.main(cli(image_sets, out))


def test_cli_writes_the_metrics_and_reuses_statistics(image_sets, one_rank, tmp_path, capsys, caplog):
    out, result = one_rank
    written = json.loads((out / "evaluation.json").read_text())
    assert written["num_samples"] == written["num_ref"] == 8 and "RANDOM INCEPTION" in written["warning"]
    model = ev.InceptionFeatures(random=True)
    direct = {}
    for name in ("samples", "ref"):  # one batch of 8 here, batches of 3 there: the same features to fp32
        with np.load(image_sets / f"{name}.npz") as f:
            features = {k: v.numpy() for k, v in model(torch.from_numpy(f["arr_0"])).items()}
        direct[name] = ev.FeatureStats.from_features(features)
    expected = ev.compute_metrics(direct["samples"], direct["ref"])
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        torch.testing.assert_close(written[key], expected[key], rtol=1e-4, atol=1e-4)
        assert result[key] == written[key]
    assert written["fid"] > 0 and written["ref_statistics"] == "computed from arr_0"
    assert sorted(os.listdir(out)) == ["evaluation.json", "ref_inception.npz", "samples_inception.npz"]
    # the second comparison reads the statistics files
    with caplog.at_level("INFO", logger="engine.evaluate"):
        again = ev.main(cli(image_sets, out))
    assert "FID " in capsys.readouterr().out
    assert sum("statistics from" in r.getMessage() for r in caplog.records) == 2 and again["fid"] == written["fid"]
    # ADM compares against the mu/sigma stored in a reference batch: here the samples' own, so FID = sFID = 0
    own, _ = ev.FeatureStats.load(str(out / "samples_inception.npz"))
    with np.load(image_sets / "ref.npz") as f:
        ev.write_reference_batch(str(tmp_path / "ref_with_stats.npz"), f["arr_0"], own)
    stored = ev.main(cli(tmp_path, out, samples="../" + os.path.basename(image_sets) + "/samples.npz",
                         ref="ref_with_stats.npz"))
    assert stored["ref_statistics"] == "stored in the reference batch"
    torch.testing.assert_close(stored["fid"], 0.0, rtol=0, atol=1e-6)
    torch.testing.assert_close(stored["sfid"], 0.0, rtol=0, atol=1e-6)
    assert (stored["precision"], stored["recall"]) == (written["precision"], written["recall"])  # arr_0's features


def test_two_ranks_resume_and_agree_with_one(image_sets, one_rank, tmp_path):
    _, one = one_rank
    out = tmp_path / "two"
    # a crashed earlier run left two parts of the samples: one good, one truncated
    model = ev.InceptionFeatures(random=True)
    reader = ev.NpzImages(str(image_sets / "samples.npz"))
    parts = out / "inception_parts" / "samples"
    os.makedirs(parts)
    meta = ev.source_meta(str(image_sets / "samples.npz"), model, 8, 3)
    (parts / "meta.json").write_text(json.dumps(meta))
    np.savez(parts / "batch_000001.npz", **{k: v.numpy() for k, v in model(reader.batch(3, 6)).items()})
    (parts / "batch_000002.npz").write_bytes(b"truncated")
    logs = run_ranks("engine.evaluate", cli(image_sets, out), timeout=240)
    assert "8 images in 3 batches of 3 over 2 rank(s); 1 batches already extracted" in logs[0]
    two = json.loads((out / "evaluation.json").read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    assert not (out / "inception_parts").exists()  # removed once the statistics are written
