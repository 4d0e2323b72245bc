"""latent.scale: auto reads the VAE's diffusers config (scaling_factor, shift_factor, latents_mean /
latents_std) and normalises as diffusers' pipelines do, saying which values it used."""
import logging

import pytest
import torch

from engine.models.latents import LatentConfig, build_latent_space


def tiny_vae(path, **config):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, **config)
    vae.save_pretrained(str(path))
    return vae.eval()


def images(n=2, res=16):
    return torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8)


@pytest.mark.parametrize("config", [dict(scaling_factor=0.5, shift_factor=0.1), dict(scaling_factor=1.5),
                                    dict(scaling_factor=0.8, latents_mean=[0.1, -0.2, 0.3, 0.0],
                                         latents_std=[1.0, 2.0, 0.5, 4.0])])
def test_auto_normalises_as_diffusers_pipelines(tmp_path, caplog, config):
    vae = tiny_vae(tmp_path / "vae", **config)
    with caplog.at_level(logging.INFO, logger="engine.models.latents"):
        space = build_latent_space(LatentConfig(kind="vae", path=str(tmp_path / "vae"), scale="auto"))
    assert f"scaling_factor={config['scaling_factor']}" in caplog.text
    batch = images()
    mean, std = space.encode(batch)
    with torch.no_grad():
        posterior = vae.encode(batch / 127.5 - 1).latent_dist
    factor = config["scaling_factor"]
    if "latents_mean" in config:  # diffusers: (z - mean) * scaling_factor / std
        m = torch.tensor(config["latents_mean"]).view(1, 4, 1, 1)
        s = torch.tensor(config["latents_std"]).view(1, 4, 1, 1)
        expected_mean, expected_std = (posterior.mean - m) * factor / s, posterior.std * factor / s
    else:  # diffusers: (z - shift_factor) * scaling_factor
        expected_mean = (posterior.mean - config.get("shift_factor", 0.0)) * factor
        expected_std = posterior.std * factor
    torch.testing.assert_close(mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, expected_std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(space.denormalise(mean), posterior.mean, rtol=1e-5, atol=1e-5)


def test_auto_errors_are_named():
    with pytest.raises(ValueError, match=r"scale: 'auto': .*kind 'vae' only"):
        LatentConfig(kind="identity", scale="auto")
    with pytest.raises(ValueError, match=r"shift: 0.5: 0 with scale 'auto'"):
        LatentConfig(kind="vae", path="x", scale="auto", shift=0.5)
