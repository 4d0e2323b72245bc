"""`engine.sample` as a multi-process, resumable FID sampler: the same images on one or two ranks,
resume after lost or truncated parts, refusal to mix settings, the evaluation-suite npz layout.

The checkpoint is the trainer's EMA export (`step_*/ema_fp32.pt` + `latest`) of the trainer tests'
tiny SiT (REPA + REG + CAR-Flow, pixel space 16 x 16), with random weights so that every part of the
model shapes the images."""
import json
import os
import zipfile

import numpy as np
import pytest
import torch

import kernels
from engine import checkpoint as ckpt
from engine.config import from_dict
from engine.models import build_model
from engine.images import generate, load_for_sampling
from engine.sample import main as sample_main
from tests.engine.common import randomize
from tests.engine.trainer_fixtures import run_ranks, tiny_config

NUM_IMAGES, BATCH_SIZE, NUM_CLASSES, RES = 10, 3, 4, 16   # 4 global batches, the last of one image


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_ckpt")
    raw = tiny_config(root / "run", root / "data", sample={"num_steps": 2, "batch_size": BATCH_SIZE})
    model = randomize(build_model(from_dict(raw).model), scale=0.1, generator=torch.Generator().manual_seed(5))
    checkpoint_dir = root / "run" / "checkpoints"
    tag = ckpt.tag_for(4)
    os.makedirs(checkpoint_dir / tag)
    torch.save({"ema": model.state_dict(), "steps": 4, "config": raw}, checkpoint_dir / tag / ckpt.EMA_FILE)
    (checkpoint_dir / ckpt.LATEST).write_text(tag)
    return str(checkpoint_dir)


@pytest.fixture(autouse=True)
def _one_thread_and_backend():
    """main() sets the kernel backend; the subprocess ranks run with OMP_NUM_THREADS=1, so does this one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with kernels.use_backend(kernels.get_backend()):
        yield
    torch.set_num_threads(threads)


def args(checkpoint_dir, out, *extra):
    return ["--ckpt", checkpoint_dir, "--out", str(out), "--num-images", str(NUM_IMAGES), "--batch-size",
            str(BATCH_SIZE), "--num-steps", "2", "--device", "cpu", *extra]


def load(path):
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def test_two_ranks_give_the_images_of_one_process(checkpoint_dir, tmp_path):
    one = sample_main(args(checkpoint_dir, tmp_path / "one"))
    assert one["num_batches"] == 4 and one["generated"] == 4 and one["skipped"] == one["corrupt"] == 0
    assert not os.path.exists(tmp_path / "one" / "parts")  # deleted once samples.npz is written
    logs = run_ranks("engine.sample", args(checkpoint_dir, tmp_path / "two", "--keep-parts"))
    assert "batch 2 (2/2 on this rank)" in logs[0] and "over 2 rank(s)" in logs[0]  # rank 0: batches 0, 2
    # resumed on two ranks: rank 0's two lost parts are dealt out, one to each rank
    for batch in (0, 2):
        os.remove(tmp_path / "two" / "parts" / f"batch_00000{batch}.npz")
    logs = run_ranks("engine.sample", args(checkpoint_dir, tmp_path / "two"))
    assert "2 batches (4 images) already done, skipped; 2 to generate" in logs[0]
    assert "batch 0 (1/1 on this rank)" in logs[0] and "Traceback" not in logs[1]
    assert not os.path.exists(tmp_path / "two" / "parts")

    single, double = load(one["npz"]), load(tmp_path / "two" / "samples.npz")
    np.testing.assert_array_equal(double["arr_0"], single["arr_0"])
    np.testing.assert_array_equal(double["labels"], single["labels"])
    assert os.path.exists(tmp_path / "two" / "samples.png")
    # ... and they are the images of the in-process sampler the trainer uses (batch i, seed sample.seed + i)
    cfg, model, latent_space = load_for_sampling(checkpoint_dir, torch.device("cpu"),
                                                 [f"sample.batch_size={BATCH_SIZE}", "sample.num_steps=2"])
    reference = generate(model, latent_space, torch.arange(NUM_IMAGES) % NUM_CLASSES, cfg, torch.device("cpu"))
    np.testing.assert_array_equal(single["arr_0"], reference.numpy())
    assert len(np.unique(single["arr_0"].reshape(NUM_IMAGES, -1), axis=0)) == NUM_IMAGES  # every image differs


def test_resume_regenerates_only_missing_and_corrupt_parts(checkpoint_dir, tmp_path, caplog):
    out = tmp_path / "eval"
    first = sample_main(args(checkpoint_dir, out, "--keep-parts"))
    reference = load(first["npz"])
    parts = out / "parts"
    assert sorted(os.listdir(parts)) == ["batch_000000.npz", "batch_000001.npz", "batch_000002.npz",
                                         "batch_000003.npz", "meta.json"]
    os.remove(parts / "batch_000001.npz")
    with open(parts / "batch_000002.npz", "r+b") as f:  # a write cut short
        f.truncate(os.path.getsize(parts / "batch_000002.npz") // 2)
    (out / "samples.npz").unlink()
    untouched = {b: os.stat(parts / f"batch_00000{b}.npz").st_mtime_ns for b in (0, 3)}

    with caplog.at_level("INFO", logger="engine.sample"):
        second = sample_main(args(checkpoint_dir, out, "--keep-parts"))
    assert (second["skipped"], second["generated"], second["corrupt"]) == (2, 2, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "batch_000002.npz" in warnings[0] and "unreadable" in warnings[0]
    assert any("2 batches (4 images) already done" in r.getMessage() for r in caplog.records)
    assert {b: os.stat(parts / f"batch_00000{b}.npz").st_mtime_ns for b in (0, 3)} == untouched
    resumed = load(second["npz"])
    np.testing.assert_array_equal(resumed["arr_0"], reference["arr_0"])
    np.testing.assert_array_equal(resumed["labels"], reference["labels"])

    # a part with the wrong shape is caught too; without --keep-parts the parts go at the end
    np.savez(parts / "batch_000000.npz", images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.arange(3))
    third = sample_main(args(checkpoint_dir, out))
    assert (third["skipped"], third["generated"], third["corrupt"]) == (3, 1, 1)
    np.testing.assert_array_equal(load(third["npz"])["arr_0"], reference["arr_0"])
    assert not os.path.exists(parts)


def test_restart_with_other_settings_is_refused(checkpoint_dir, tmp_path):
    out = tmp_path / "eval"
    sample_main(args(checkpoint_dir, out, "--keep-parts"))
    before = load(out / "parts" / "batch_000000.npz")
    with pytest.raises(ValueError, match=r"num_steps: 2 there, 3 now") as error:
        sample_main(args(checkpoint_dir, out, "--num-steps", "3"))
    assert "--overwrite" in str(error.value) and "seed" not in str(error.value)
    np.testing.assert_array_equal(load(out / "parts" / "batch_000000.npz")["images"], before["images"])
    with pytest.raises(ValueError, match=r"seed: 0 there, 1 now.*cfg_scale: 1.0 there, 2.0 now|"
                                         r"cfg_scale: 1.0 there, 2.0 now.*seed: 0 there, 1 now"):
        sample_main(args(checkpoint_dir, out, "--seed", "1", "--cfg-scale", "2.0"))
    with pytest.raises(ValueError, match=r"precision: 'tf32' there, 'bf16' now"):
        sample_main(args(checkpoint_dir, out, "--precision", "bf16"))
    # --overwrite starts afresh with the new settings
    fresh = sample_main(args(checkpoint_dir, out, "--num-steps", "3", "--overwrite"))
    assert (fresh["skipped"], fresh["generated"]) == (0, 4)
    assert not np.array_equal(load(fresh["npz"])["arr_0"][:3], before["images"])


def test_npz_has_the_evaluation_suite_layout(checkpoint_dir, tmp_path):
    out = sample_main(args(checkpoint_dir, tmp_path / "eval", "--seed", "7"))
    with zipfile.ZipFile(out["npz"]) as zf:
        assert sorted(zf.namelist()) == ["arr_0.npy", "labels.npy"]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        with zf.open("arr_0.npy") as f:  # how the ADM evaluator streams it
            version = np.lib.format.read_magic(f)
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    assert version == (1, 0) and (shape, fortran_order, dtype) == ((NUM_IMAGES, RES, RES, 3), False, np.dtype(np.uint8))
    samples = load(out["npz"])
    assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (NUM_IMAGES, RES, RES, 3)
    np.testing.assert_array_equal(samples["labels"], np.arange(NUM_IMAGES) % NUM_CLASSES)
    assert samples["arr_0"].min() < 64 and samples["arr_0"].max() > 192  # not a constant image
    from PIL import Image
    assert Image.open(out["grid"]).size[0] > RES  # a grid, enlarged for viewing


def test_bad_input_is_named(checkpoint_dir, tmp_path):
    with pytest.raises(SystemExit):  # argparse: --num-images must be >= 1
        sample_main(args(checkpoint_dir, tmp_path / "a")[:4] + ["--num-images", "0", "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="no_such_ckpt"):
        sample_main(args(str(tmp_path / "no_such_ckpt"), tmp_path / "b"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a_file is a file"):
        sample_main(args(checkpoint_dir, tmp_path / "a_file"))
    os.makedirs(tmp_path / "c" / "parts")
    np.savez(tmp_path / "c" / "parts" / "batch_000000.npz", images=np.zeros(1))
    with pytest.raises(ValueError, match="no meta.json"):
        sample_main(args(checkpoint_dir, tmp_path / "c"))


def test_bf16_sampling_stays_close_to_fp32(checkpoint_dir, tmp_path):
    """--precision bf16 runs the model under bf16 autocast: the images move by a few grey levels, not more."""
    fp32 = load(sample_main(args(checkpoint_dir, tmp_path / "fp32", "--precision", "fp32"))["npz"])["arr_0"]
    bf16 = load(sample_main(args(checkpoint_dir, tmp_path / "bf16", "--precision", "bf16"))["npz"])["arr_0"]
    difference = np.abs(fp32.astype(np.int16) - bf16.astype(np.int16))
    print(f"mean |bf16 - fp32| = {difference.mean():.3f} grey levels")
    assert 0 < difference.mean() < 8, difference.mean()


def test_guidance_interval_flags(checkpoint_dir, tmp_path, capsys):
    """--guidance-low / --guidance-high reach the sampler (the images of engine.samplers.sample with that
    guidance_interval, batch b with seed sample.seed + b), are part of the settings a restart must keep
    (parts from before the flags existed count as [0, 1]), and bad values are one-line errors."""
    from engine.images import to_uint8
    from engine.samplers import sample

    guided = ("--cfg-scale", "3.0")
    split = load(sample_main(args(checkpoint_dir, tmp_path / "split", *guided, "--guidance-low", "0.3",
                                  "--guidance_high", "0.7", "--keep-parts"))["npz"])["arr_0"]  # REPA's spelling
    cfg, model, latent_space = load_for_sampling(checkpoint_dir, torch.device("cpu"))
    labels = torch.arange(NUM_IMAGES) % NUM_CLASSES
    want = []
    for b, start in enumerate(range(0, NUM_IMAGES, BATCH_SIZE)):  # 2 steps: t_cur = 1 (not guided), 0.5 (guided)
        latents = sample(model, labels[start:start + BATCH_SIZE], num_steps=2, method=cfg.sample.method,
                         cfg_scale=3.0, guidance_interval=(0.3, 0.7), seed=cfg.sample.seed + b,
                         transport_cfg=cfg.transport)
        want.append(to_uint8(latent_space.decode(latents)))
    np.testing.assert_array_equal(split, torch.cat(want).numpy())
    plain = load(sample_main(args(checkpoint_dir, tmp_path / "plain", *guided, "--keep-parts"))["npz"])["arr_0"]
    unguided = load(sample_main(args(checkpoint_dir, tmp_path / "unguided"))["npz"])["arr_0"]
    assert not np.array_equal(split, plain) and not np.array_equal(split, unguided)

    with pytest.raises(ValueError, match=r"guidance_high: 0.7 there, 0.8 now"):
        sample_main(args(checkpoint_dir, tmp_path / "split", *guided, "--guidance-low", "0.3",
                         "--guidance-high", "0.8"))
    meta_path = tmp_path / "plain" / "parts" / "meta.json"
    meta = {k: v for k, v in json.loads(meta_path.read_text()).items() if not k.startswith("guidance_")}
    meta_path.write_text(json.dumps(meta))  # parts written before the flags existed
    resumed = sample_main(args(checkpoint_dir, tmp_path / "plain", *guided))
    assert (resumed["skipped"], resumed["generated"]) == (4, 0)

    for bad, said in ((("--guidance-low", "1.5"), "--guidance-low must be in [0, 1]"),
                      (("--guidance-high", "nan"), "--guidance-high must be in [0, 1]"),
                      (("--guidance-low", "0.8", "--guidance-high", "0.2"), "--guidance-low 0.8 must be <=")):
        with pytest.raises(SystemExit):
            sample_main(args(checkpoint_dir, tmp_path / "bad", *bad))
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert said in error, error
