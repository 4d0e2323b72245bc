"""Weights made elsewhere (engine.models.pretrained): SiT's learn_sigma checkpoints, REPA / REG train.py
checkpoints (with their argparse options, DDP prefixes and the legacy decoder_blocks), read strict by
engine.sample and by the trainer's checkpoint.init_weights. The files are written in those releases'
layouts from our model with the key mapping inverted."""
import argparse

import numpy as np
import pytest
import torch

import kernels
from engine.config import from_dict
from engine.models import build_model
from engine.models.pretrained import load_pretrained, map_keys, model_config_from_state_dict, read_checkpoint
from engine.sample import main as sample_main
from tests.engine.common import randomize, repa_forward, tiny_config
from tests.engine.trainer_fixtures import tiny_config as tiny_experiment, write_config

SEED = torch.Generator().manual_seed


@pytest.fixture(autouse=True)
def _keep_backend():
    with kernels.use_backend("torch"):
        yield


def to_legacy(state, encoder_depth, prefix=""):
    """Our state dict in the layout of REPA's early checkpoints: blocks after encoder_depth are
    decoder_blocks numbered from 0 (the inverse of utils.load_legacy_checkpoints), with a DDP prefix."""
    out = {}
    for key, value in state.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) >= encoder_depth:
            _, index, rest = key.split(".", 2)
            key = f"decoder_blocks.{int(index) - encoder_depth}.{rest}"
        out[prefix + key] = value
    return out


def repa_payload(model, ema_state, **args):
    """What REPA's (and REG's) train.py saves: model, ema, opt, args (argparse.Namespace), steps."""
    options = dict(model="SiT-S/2", num_classes=model.cfg.num_classes, encoder_depth=model.cfg.encoder_depth,
                   cfg_prob=model.cfg.class_dropout_prob, path_type="linear", qk_norm=model.cfg.qk_norm,
                   weighting="uniform", proj_coeff=0.5, enc_type="dinov2-vit-b", resolution=256)
    options.update(args)
    return {"model": model.state_dict(), "ema": ema_state, "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(**options), "steps": 1000}


def test_learn_sigma_state_dict_loads_strict_and_returns_the_first_half():
    """SiT's released checkpoints: the final layer gives 2C channels; the velocity is the first C."""
    cfg = tiny_config(learn_sigma=True, z_dims=[])
    model = randomize(build_model(cfg), generator=SEED(1)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    p, C, D = cfg.patch_size, cfg.in_channels, cfg.hidden_size
    assert state["final_layer.linear.weight"].shape == (p * p * 2 * C, D)
    fresh = build_model(cfg).eval()
    fresh.load_state_dict(state, strict=True)
    x, t, y = torch.randn(3, C, 8, 8), torch.rand(3), torch.tensor([0, 4, 10])
    with torch.no_grad():
        velocity, zs = fresh(x, t, y)
        # REPA's forward on the 2C-channel head (unpatchified as 2C channels), then SiT's chunk(2)[0]
        full, _ = repa_forward(state, tiny_config(learn_sigma=True, z_dims=[], in_channels=2 * C), x, t, y)
    assert velocity.shape == (3, C, 8, 8) and zs == []
    torch.testing.assert_close(velocity, full[:, :C], rtol=1e-5, atol=1e-5)
    # a 4-channel head does not take a learn_sigma checkpoint (strict)
    with pytest.raises(RuntimeError, match="final_layer.linear.weight"):
        build_model(tiny_config(z_dims=[])).load_state_dict(state, strict=True)


def test_model_config_is_read_from_the_tensors_of_a_sit_xl_release():
    """The shapes of SiT-XL-2-256x256.pt (learn_sigma, 1001 embedding rows, no projectors), on meta tensors."""
    with torch.device("meta"):
        model = build_model(tiny_config(name="SiT-XL/2", hidden_size=None, depth=None, num_heads=None,
                                         input_size=32, num_classes=1000, learn_sigma=True, z_dims=[]))
    state = model.state_dict()
    assert state["final_layer.linear.weight"].shape == (32, 1152)
    fixed = model_config_from_state_dict(state)
    assert fixed == dict(fixed, name="SiT-XL/2", depth=28, hidden_size=1152, num_heads=16, patch_size=2,
                         input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, z_dims=[], reg=False,
                         qk_norm=False, car_flow="none")


@pytest.mark.parametrize("legacy", [False, True])
def test_repa_checkpoint_maps_to_our_keys(tmp_path, legacy):
    cfg = tiny_config(depth=3, encoder_depth=1, z_dims=[24, 16], qk_norm=True)
    model = randomize(build_model(cfg), generator=SEED(2))
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}  # "ema" is read, not "model"
    saved = to_legacy(ema, cfg.encoder_depth, prefix="module.") if legacy else ema
    path = tmp_path / "0001000.pt"
    torch.save(repa_payload(model, saved, path_type="cosine"), path)
    read = read_checkpoint(str(path))
    assert read["format"] == "repa" and read["args"]["path_type"] == "cosine"
    assert sorted(read["state"]) == sorted(ema)
    for key, value in ema.items():
        torch.testing.assert_close(read["state"][key], value, rtol=0, atol=0)
    fixed = model_config_from_state_dict(read["state"], read["args"])
    assert fixed == dict(fixed, depth=3, hidden_size=32, num_heads=2, z_dims=[24, 16], projector_dim=32,
                         qk_norm=True, encoder_depth=1, num_classes=10, class_dropout_prob=0.1, learn_sigma=False)


def test_legacy_keys_without_encoder_depth_are_refused():
    with pytest.raises(ValueError, match="encoder depth"):
        map_keys({"decoder_blocks.0.attn.qkv.weight": torch.zeros(1)})


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"hello": "world"}, path)
    with pytest.raises(ValueError, match="holds no state dict"):
        read_checkpoint(str(path))
    torch.save({"ema": Opaque()}, path)  # code torch.load must not run: refused by weights_only
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        read_checkpoint(str(path))


class Opaque:
    pass


def _experiment(tmp_path, **sections):
    sample = {**dict(num_steps=2, batch_size=2, num_images=4, method="euler"), **sections.pop("sample", {})}
    raw = tiny_experiment(tmp_path / "run", tmp_path / "data", sample=sample, **sections)
    return raw, build_model(from_dict(raw).model)


def test_engine_sample_reads_a_reg_checkpoint_as_its_own_export(tmp_path):
    """The same weights as a REG train.py checkpoint (+ --config) and as our EMA export give the same
    images through engine.sample (REG + CAR-Flow model, pixel space)."""
    raw, model = _experiment(tmp_path)
    randomize(model, scale=0.1, generator=SEED(3))
    ours = tmp_path / "ema_fp32.pt"
    torch.save({"ema": model.state_dict(), "steps": 4, "config": raw}, ours)
    theirs = tmp_path / "reg.pt"
    torch.save(repa_payload(model, to_legacy(model.state_dict(), 1, prefix="module.")), theirs)
    # the user's YAML: what a non-preset model's shapes do not tell (its heads); the rest is read
    config = write_config(dict(raw, model={"num_heads": 2}), tmp_path / "sample.yaml")
    common = ["--num-images", "4", "--batch-size", "2", "--num-steps", "2", "--device", "cpu"]
    a = sample_main(["--ckpt", str(ours), "--out", str(tmp_path / "a"), *common])
    b = sample_main(["--ckpt", str(theirs), "--config", config, "--out", str(tmp_path / "b"), *common])
    images_a, images_b = np.load(a["npz"])["arr_0"], np.load(b["npz"])["arr_0"]
    assert images_a.std() > 0
    np.testing.assert_array_equal(images_a, images_b)
    with pytest.raises(ValueError, match="--config"):
        sample_main(["--ckpt", str(theirs), "--out", str(tmp_path / "c"), *common])


def test_sit_release_is_sampled_in_sits_time_direction(tmp_path):
    """A learn_sigma state dict without REPA options is SiT's: transport.reversed_time is set."""
    raw, _ = _experiment(tmp_path)
    cfg = from_dict(raw).model
    sit = build_model(tiny_config(name=cfg.name, hidden_size=32, depth=2, num_heads=2, patch_size=4, input_size=16,
                                  in_channels=3, num_classes=4, z_dims=[], learn_sigma=True))
    path = tmp_path / "SiT-tiny.pt"
    torch.save(sit.state_dict(), path)
    got, state, fixed, _ = load_pretrained(str(path), {k: v for k, v in raw.items() if k != "model"} | {
        "model": {"name": cfg.name, "num_heads": 2}})
    assert got["transport"]["reversed_time"] is True and got["encoders"] == []
    assert fixed["learn_sigma"] is True and fixed["z_dims"] == []
    model = build_model(from_dict(got).model)
    model.load_state_dict(state, strict=True)


def test_trainer_fine_tunes_from_a_repa_checkpoint(tmp_path):
    """checkpoint.init_weights: the model and its EMA start from the checkpoint's EMA weights; a config
    whose model differs is refused naming the key."""
    from engine.trainer import Trainer

    raw, model = _experiment(tmp_path, train={"max_steps": 1}, sample={"num_images": 0})
    randomize(model, scale=0.1, generator=SEED(4))
    path = tmp_path / "repa.pt"
    torch.save(repa_payload(model, model.state_dict()), path)
    raw["checkpoint"] = dict(raw["checkpoint"], init_weights=str(path))
    # The one-rank group the Trainer joins stays up for later in-process trainers, as within test_train.py
    # (a group ended under DeepSpeed leaves it a stale world-group clone).
    trainer = Trainer(from_dict(raw))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trainer.engine.module.state_dict()[name].float(), value, rtol=0, atol=0,
                                   msg=name)
    ema = trainer.ema.full_state_dict()
    torch.testing.assert_close(ema["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"],
                               rtol=0, atol=0)
    bad = dict(raw, model=dict(raw["model"], projector_dim=16))
    with pytest.raises(ValueError, match="model.projector_dim=16 .* allowed: 32"):
        Trainer(from_dict(bad))
