"""data.source 'repa': REPA's preprocessed layout (images/, vae-sd/ of per-image posterior moments,
vae-sd/dataset.json), written here exactly as REPA's preprocessing/dataset_tools.py names it, read by
the loader as it is; the trainer samples its latents as REPA's sample_posterior does; corrupt and
missing files are skipped and counted, or named under on_corrupt: error."""
import json
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DataConfig, build_loader
from engine.data.index import CorruptImageError
from engine.models.latents import LatentConfig, build_latent_space

RES, C = 16, 3


def write_repa_tree(root, n=12, num_classes=3, seed=0):
    """(images uint8 (n, R, R, 3), moments float32 (n, 2C, R, R), labels) written in REPA's layout."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)
    moments = rng.standard_normal((n, 2 * C, RES, RES)).astype(np.float32)
    moments[:, C:] = np.abs(moments[:, C:]) * 0.1
    labels = rng.integers(0, num_classes, n).tolist()
    labels[0] = num_classes - 1
    image_labels, latent_labels = [], []
    for idx in range(n):
        s = f"{idx:08d}"
        image_name, latent_name = f"{s[:5]}/img{s}.png", f"{s[:5]}/img-mean-std-{s}.npy"
        os.makedirs(os.path.join(root, "images", s[:5]), exist_ok=True)
        os.makedirs(os.path.join(root, "vae-sd", s[:5]), exist_ok=True)
        Image.fromarray(images[idx]).save(os.path.join(root, "images", image_name), compress_level=0)
        np.save(os.path.join(root, "vae-sd", latent_name), moments[idx])
        image_labels.append([image_name, labels[idx]])
        latent_labels.append([latent_name, labels[idx]])
    for folder, entries in (("images", image_labels), ("vae-sd", latent_labels)):
        with open(os.path.join(root, folder, "dataset.json"), "w") as f:
            json.dump({"labels": entries}, f)
    return images, moments, np.array(labels)


def repa_config(root, **overrides):
    values = dict(source="repa", root=str(root), resolution=RES, batch_size=4, random_flip=False, shuffle=False,
                  decoder="pil", num_workers=0, cache_dir=str(root) + "_cache")
    values.update(overrides)
    return DataConfig(**values)


def test_batches_carry_the_images_labels_and_raw_moments(tmp_path):
    images, moments, labels = write_repa_tree(tmp_path / "repa")
    loader = build_loader(repa_config(tmp_path / "repa"), 0, 1, "cpu")
    assert len(loader) == 3 and loader.num_classes == 3
    seen = 0
    for batch in loader:
        rows = np.array([int(key.split("img")[1][:8]) for key in batch["keys"]])
        np.testing.assert_array_equal(batch["image"].permute(0, 2, 3, 1).numpy(), images[rows])
        np.testing.assert_array_equal(batch["label"].numpy(), labels[rows])
        torch.testing.assert_close(batch["latent_mean"], torch.from_numpy(moments[rows, :C]), rtol=0, atol=0)
        torch.testing.assert_close(batch["latent_std"], torch.from_numpy(moments[rows, C:]), rtol=0, atol=0)
        assert batch["latent_raw"] is True
        seen += len(rows)
    assert seen == 12


def test_trainer_samples_the_moments_as_repas_sample_posterior(tmp_path):
    """Trainer.prepare on a REPA batch: z = (mean + std * eps) * scale + bias, eps from the latent generator."""
    from engine.trainer import Trainer

    write_repa_tree(tmp_path / "repa")
    batch = next(iter(build_loader(repa_config(tmp_path / "repa"), 0, 1, "cpu")))
    scale, shift = [0.5, 0.25, 2.0], [0.1, -0.2, 0.0]
    space = build_latent_space(LatentConfig(kind="identity", scale=scale, shift=shift))
    generator = torch.Generator().manual_seed(11)
    trainer = types.SimpleNamespace(device=torch.device("cpu"), encoders=[], latent_space=space,
                                    latent_generator=generator, model_dtype=torch.float32,
                                    cfg=types.SimpleNamespace(model=types.SimpleNamespace(reg=False)))
    eps = torch.randn(batch["latent_mean"].shape, generator=torch.Generator().manual_seed(11))
    x, labels, _, _ = Trainer.prepare(trainer, batch)
    moments = torch.cat([batch["latent_mean"], batch["latent_std"]], dim=1)
    mean, std = torch.chunk(moments, 2, dim=1)  # REPA's train.sample_posterior, written out
    expected = (mean + std * eps) * torch.tensor(scale).view(1, C, 1, 1) + torch.tensor(shift).view(1, C, 1, 1)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(labels, batch["label"], rtol=0, atol=0)


def test_corrupt_and_missing_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "repa"
    write_repa_tree(root)
    bad_image = root / "images" / "00000" / "img00000003.png"
    bad_image.write_bytes(bad_image.read_bytes()[:100])                     # truncated PNG
    short = root / "vae-sd" / "00000" / "img-mean-std-00000005.npy"
    short.write_bytes(short.read_bytes()[:-8])                              # truncated latent
    loader = build_loader(repa_config(root, batch_size=2), 0, 1, "cpu")
    assert len(loader.index) == 10 and loader.skipped == 2
    assert {os.path.basename(path) for path, _ in loader.index.skipped} == {bad_image.name, short.name}
    assert not any("00000003" in k or "00000005" in k for k in loader.index.keys)
    with pytest.raises(CorruptImageError, match="img-mean-std-00000005.npy"):
        bad_image.unlink()
        os.remove(root / "vae-sd" / "00000" / "img-mean-std-00000003.npy")  # keep the counts equal
        build_loader(repa_config(root, on_corrupt="error"), 0, 1, "cpu")


def test_layout_errors_are_named(tmp_path):
    root = tmp_path / "repa"
    write_repa_tree(root)
    with pytest.raises(ValueError, match="random_flip: true: false with source 'repa'"):
        repa_config(root, random_flip=True)
    os.remove(root / "vae-sd" / "00000" / "img-mean-std-00000002.npy")
    with pytest.raises(ValueError, match="12 images in images/ but 11 latents"):
        build_loader(repa_config(root), 0, 1, "cpu")
    os.makedirs(tmp_path / "elsewhere" / "images")
    with pytest.raises(FileNotFoundError, match="vae-sd is missing"):
        build_loader(repa_config(tmp_path / "elsewhere"), 0, 1, "cpu")


def test_trainer_trains_on_a_repa_tree(tmp_path):
    """End to end: two steps of the trainer tests' tiny SiT on REPA's layout (3-channel moments at full
    resolution: the identity latent space stands in for the SD-VAE)."""
    from engine.config import from_dict
    from engine.trainer import Trainer
    from tests.engine.trainer_fixtures import tiny_config

    write_repa_tree(tmp_path / "repa")
    raw = tiny_config(tmp_path / "run", tmp_path / "repa", train={"max_steps": 2},
                      data={"source": "repa", "random_flip": False, "num_classes": None},
                      latent={"kind": "identity", "scale": 0.5})
    raw["model"]["num_classes"] = 4
    # The one-rank group the Trainer joins stays up for later in-process trainers, as within test_train.py
    # (a group ended under DeepSpeed leaves it a stale world-group clone).
    results = Trainer(from_dict(raw)).fit()
    assert results["step"] == 2 and results["nonfinite_total"] == 0
