"""Latent spaces: where the flow runs. "vae" (diffusers AutoencoderKL), "identity" (pixel space) or
"module" (any autoencoder of the user's, named as "package.module:factory").

Latents are normalised as REPA does: latent = z * scale + shift, with z the VAE's latent and scale /
shift scalars or one value per channel (sd-vae-ft-ema/mse: scale 0.18215, shift 0; ReaLS: per channel).

    space = build_latent_space(LatentConfig(kind="vae", path="/models/sd-vae-ft-ema"))
    mean, std = space.encode(images_uint8)       # normalised posterior; sample x = mean + std * eps
    raw = space.encode_raw(images_uint8)         # the posterior before scale / shift (what latent shards
                                                 # store); space.normalise(*raw) is encode's (mean, std)
    images = space.decode(x)                     # (B, 3, H, W) in [-1, 1]

A "module" latent space plugs in an autoencoder that is not a diffusers AutoencoderKL: `path` names a
factory, `factory(cfg)` returns an nn.Module with `encode(x)` (x float (B, 3, H, W) in [-1, 1]) giving
the posterior `(mean, std)` or a deterministic latent tensor, `decode(z)` giving images in [-1, 1], and
the attributes `channels` and `downsample`. Scale and shift are applied around it as for a VAE.
"""
from __future__ import annotations


import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from engine.configurable import FromDict, finite_number, invalid

KINDS = ("identity", "vae", "module")
log = logging.getLogger("engine.models.latents")


@dataclass
class LatentConfig(FromDict):
    kind: str = "vae"
    path: str | None = None                 # vae: local diffusers folder or cached hub id; module: "pkg.mod:factory"
    subfolder: str | None = None
    # None: 0.18215 for a VAE (SD-VAE's), 1.0 otherwise; "auto": from the VAE's diffusers config
    # (scaling_factor, shift_factor, latents_mean / latents_std; see auto_normalisation), logged
    scale: float | list[float] | Literal["auto"] | None = None
    shift: float | list[float] = 0.0
    dtype: str = "float32"                  # VAE compute dtype

    def __post_init__(self):
        if self.kind not in KINDS:
            raise invalid("kind", self.kind, f"one of {', '.join(KINDS)}")
        if self.scale is None:
            self.scale = 0.18215 if self.kind == "vae" else 1.0
        if self.kind == "module" and (not self.path or self.path.count(":") != 1 or not all(self.path.split(":"))):
            raise invalid("path", self.path, "'package.module:factory' for kind 'module', a function that takes "
                          "the LatentConfig and returns the autoencoder")
        if self.kind == "vae" and not self.path:
            raise invalid("path", self.path, "for kind 'vae' a local diffusers AutoencoderKL folder (e.g. one "
                          "saved from stabilityai/sd-vae-ft-ema) or a cached hub repo id")
        if self.scale == "auto":
            if self.kind != "vae":
                raise invalid("scale", self.scale, "numbers for kind " + repr(self.kind) + " ('auto' reads a VAE's "
                              "diffusers config: kind 'vae' only)")
            if self.shift not in (0, 0.0):
                raise invalid("shift", self.shift, "0 with scale 'auto' (the shift comes from the VAE's config too)")
        for key in ("scale", "shift") if self.scale != "auto" else ("shift",):
            value = getattr(self, key)
            values = value if isinstance(value, (list, tuple)) else [value]
            if not values or any(not finite_number(v) for v in values):
                raise invalid(key, value, "a finite number or a list of finite numbers (one per latent channel)")
        if self.scale != "auto" and any(v == 0 for v in (self.scale if isinstance(self.scale, (list, tuple))
                                                         else [self.scale])):
            raise invalid("scale", self.scale, "non-zero values")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise invalid("dtype", self.dtype, "one of float32, float16, bfloat16")


def _per_channel(value, channels: int, key: str) -> torch.Tensor:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * channels
    if len(values) != channels:
        raise ValueError(f"LatentConfig.{key} has {len(values)} values for {channels} latent channels")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], p / 127.5 - 1 correctly rounded, the same bits on every
    device: latent shards written on one device train like online encoding on another."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got shape {tuple(images.shape)}")
    pixels = images.float()
    # The divisor is a tensor on the images' device, not a Python number: CUDA divides by a CPU scalar
    # as a multiplication by its float32 reciprocal, 1 ulp off the quotient for 111 of the 256 values
    # (seen on the H200, 2026-12-04), where the CPU divides exactly; both divide exactly by a tensor.
    return pixels / torch.full((), 127.5, device=pixels.device) - 1.0


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw x = mean + std * eps of the diagonal Gaussian posterior `encode` gives (or the latent
    shards store), eps ~ N(0, I); std 0 gives the mean."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


class _FrozenAutoencoder(nn.Module):
    """A frozen autoencoder's latents as the flow sees them: z * scale + shift, per channel."""

    def _normalise_channels(self, channels: int, scale=None, shift=None) -> None:
        self.channels = int(channels)
        scale = self.cfg.scale if scale is None else scale
        shift = self.cfg.shift if shift is None else shift
        self.register_buffer("scale", _per_channel(scale, self.channels, "scale"), persistent=False)
        self.register_buffer("shift", _per_channel(shift, self.channels, "shift"), persistent=False)

    def normalise(self, mean: torch.Tensor, std: torch.Tensor):
        """Raw posterior moments (encode_raw's, or raw latent shards') -> the flow's: z * scale + shift."""
        return mean.float() * self.scale + self.shift, std.float() * self.scale.abs()

    @torch.no_grad()
    def encode(self, images):
        """Normalised posterior (mean, std), each (B, C, H/f, W/f) float32."""
        return self.normalise(*self.encode_raw(images))

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() - self.shift) / self.scale

    def train(self, mode: bool = True):
        return super().train(False)


class IdentityLatentSpace(_FrozenAutoencoder):
    """Pixel space: latents are the images in [-1, 1] (times scale, plus shift); std is zero."""

    downsample = 1

    def __init__(self, cfg: LatentConfig):
        super().__init__()
        self.cfg = cfg
        self._normalise_channels(3)

    @torch.no_grad()
    def encode_raw(self, images):
        pixels = to_unit_range(images)
        return pixels, torch.zeros_like(pixels)

    @torch.no_grad()
    def decode(self, latents):
        return self.denormalise(latents).clamp(-1, 1)


class VAELatentSpace(_FrozenAutoencoder):
    def __init__(self, cfg: LatentConfig, vae: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.vae = vae.eval().requires_grad_(False)
        self.dtype = getattr(torch, cfg.dtype)
        if cfg.scale == "auto":
            scale, shift, how = auto_normalisation(vae.config)
            log.info("latent.scale: auto from %s: %s; scale %s, shift %s", cfg.path, how, scale, shift)
            self._normalise_channels(vae.config.latent_channels, scale, shift)
        else:
            self._normalise_channels(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_raw(self, images):
        """The VAE's posterior (mean, std), each (B, C, H/f, W/f), in the VAE's dtype."""
        posterior = self.vae.encode(to_unit_range(images).to(self.dtype)).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def decode(self, latents):
        return self.vae.decode(self.denormalise(latents).to(self.dtype)).sample.float().clamp(-1, 1)


def auto_normalisation(config) -> tuple[list[float], list[float], str]:
    """(scale, shift) per channel such that latent = z * scale + shift is what diffusers' pipelines feed
    their denoiser, from an AutoencoderKL config, and a line saying which values were used:
        latents_mean / latents_std given:  (z - mean) * scaling_factor / std
        else:                              (z - shift_factor) * scaling_factor   (shift_factor None: 0)"""
    channels = int(config.latent_channels)
    factor = float(getattr(config, "scaling_factor", None) or 0.18215)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != channels or len(std) != channels or any(v <= 0 for v in std):
            raise ValueError(f"the VAE config's latents_mean / latents_std {mean} / {std} do not give {channels} "
                             "positive per-channel values")
        scale = [factor / s for s in std]
        shift = [-m * factor / s for m, s in zip(mean, std)]
        return scale, shift, f"scaling_factor={factor}, latents_mean={mean}, latents_std={std}"
    shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
    return [factor] * channels, [-shift_factor * factor] * channels, \
        f"scaling_factor={factor}, shift_factor={shift_factor}"


class ModuleLatentSpace(_FrozenAutoencoder):
    """A user's autoencoder (see the module docstring for what the factory returns)."""

    def __init__(self, cfg: LatentConfig, autoencoder: nn.Module):
        super().__init__()
        missing = [name for name in ("encode", "decode", "channels", "downsample") if not hasattr(autoencoder, name)]
        if missing:
            raise TypeError(f"LatentConfig.path={cfg.path!r} returned {type(autoencoder).__name__}, which lacks "
                            f"{missing}; a latent space needs encode, decode, channels and downsample")
        self.cfg = cfg
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self._normalise_channels(autoencoder.channels)
        self.downsample = int(autoencoder.downsample)

    @torch.no_grad()
    def encode_raw(self, images):
        """The autoencoder's posterior (mean, std), each (B, C, H/f, W/f) (std 0 for a deterministic
        encoder)."""
        out = self.autoencoder.encode(to_unit_range(images))
        mean, std = out if isinstance(out, (tuple, list)) else (out, torch.zeros_like(out))
        expected = (images.shape[0], self.channels, images.shape[2] // self.downsample,
                    images.shape[3] // self.downsample)
        if tuple(mean.shape) != expected or tuple(std.shape) != expected:
            raise ValueError(f"{self.cfg.path}: encode gave {tuple(mean.shape)} / {tuple(std.shape)}, expected "
                             f"{expected} from channels={self.channels} and downsample={self.downsample}")
        return mean, std

    @torch.no_grad()
    def decode(self, latents):
        return self.autoencoder.decode(self.denormalise(latents)).float().clamp(-1, 1)


def _load_factory(path: str):
    import importlib

    module_name, name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"LatentConfig.path={path!r}: cannot import {module_name!r} ({error})") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise AttributeError(f"LatentConfig.path={path!r}: {module_name} has no callable {name!r}")
    return factory


def build_latent_space(cfg: LatentConfig, device=None) -> nn.Module:
    if cfg.kind == "identity":
        space = IdentityLatentSpace(cfg)
    elif cfg.kind == "module":
        space = ModuleLatentSpace(cfg, _load_factory(cfg.path)(cfg))
    else:
        from diffusers import AutoencoderKL
        local = os.path.isdir(cfg.path)
        try:
            vae = AutoencoderKL.from_pretrained(cfg.path, subfolder=cfg.subfolder, local_files_only=True,
                                                torch_dtype=getattr(torch, cfg.dtype))
        except (OSError, ValueError) as error:
            where = "folder" if local else "hub cache entry"
            raise FileNotFoundError(
                f"cannot load AutoencoderKL from {where} {cfg.path!r}: {error}. Save one with "
                f"`AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-ema').save_pretrained(PATH)` on a machine "
                f"with network access and point LatentConfig.path at PATH.") from error
        space = VAELatentSpace(cfg, vae)
    return space.to(device) if device is not None else space
