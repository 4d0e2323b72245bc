"""The Hugging Face Hub layout (engine.models.hub_layout; engine.models.hub exports to it), offline:
export of an EMA checkpoint to config.json + model.safetensors through PyTorchModelHubMixin,
SiTForHub.from_pretrained, and engine.sample --ckpt on the folder (the same images as from the export
it came from). push_to_hub needs network: not run here."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kernels
from engine import checkpoint as ckpt
from engine.config import from_dict
from engine.models import build_model
from engine.models.hub import export, main as hub_main
from engine.models.hub_layout import HUB_CONFIG, HUB_WEIGHTS, SiTForHub
from engine.sample import main as sample_main
from tests.engine.common import randomize
from tests.engine.trainer_fixtures import tiny_config


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with kernels.use_backend("torch"):
        yield


@pytest.fixture
def checkpoint_dir(tmp_path):
    raw = tiny_config(tmp_path / "run", tmp_path / "data", sample={"num_steps": 2, "batch_size": 2, "num_images": 4})
    model = randomize(build_model(from_dict(raw).model), scale=0.1, generator=torch.Generator().manual_seed(7))
    directory = tmp_path / "run" / "checkpoints"
    tag = ckpt.tag_for(3)
    os.makedirs(directory / tag)
    torch.save({"ema": model.state_dict(), "steps": 3, "config": raw}, directory / tag / ckpt.EMA_FILE)
    (directory / ckpt.LATEST).write_text(tag)
    return str(directory), raw, model.state_dict()


def test_export_writes_config_and_ema_safetensors(checkpoint_dir, tmp_path):
    directory, raw, state = checkpoint_dir
    out = tmp_path / "hub"
    hub_main(["--ckpt", directory, "--out", str(out)])
    assert {HUB_CONFIG, HUB_WEIGHTS} <= set(os.listdir(out))
    with open(out / HUB_CONFIG) as f:
        assert json.load(f) == json.loads(json.dumps(raw))  # the experiment config is config.json
    weights = load_file(str(out / HUB_WEIGHTS))
    assert sorted(weights) == sorted(state)
    for name, value in state.items():
        assert weights[name].dtype == torch.float32
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)
    model = SiTForHub.from_pretrained(str(out), strict=True)
    assert model.experiment_config == json.loads(json.dumps(raw))
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 4])
    reference = build_model(from_dict(raw).model).eval()
    reference.load_state_dict(state, strict=True)
    with torch.no_grad():
        cls = torch.randn(2, 64)
        torch.testing.assert_close(model.eval()(x, t, y, cls_token=cls)[0], reference(x, t, y, cls_token=cls)[0],
                                   rtol=0, atol=0)


def test_engine_sample_reads_the_hub_folder(checkpoint_dir, tmp_path):
    directory, _, _ = checkpoint_dir
    folder = export(directory, str(tmp_path / "hub"))
    common = ["--num-images", "4", "--batch-size", "2", "--num-steps", "2", "--device", "cpu"]
    a = sample_main(["--ckpt", directory, "--out", str(tmp_path / "a"), *common])
    b = sample_main(["--ckpt", folder, "--out", str(tmp_path / "b"), *common])
    images = np.load(a["npz"])["arr_0"]
    assert images.std() > 0
    np.testing.assert_array_equal(images, np.load(b["npz"])["arr_0"])


def test_a_folder_without_weights_is_named(checkpoint_dir, tmp_path):
    directory, _, _ = checkpoint_dir
    folder = export(directory, str(tmp_path / "hub"))
    os.remove(os.path.join(folder, HUB_WEIGHTS))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        sample_main(["--ckpt", folder, "--out", str(tmp_path / "c"), "--device", "cpu"])
