"""Flow-matching transport: paths, time sampling, the training losses, and velocity -> noise/score.

Time direction of REPA/REG (t = 0 data, t = 1 noise), with CAR-Flow shifts mu0(y), mu1(y):
    z1 = x + mu1,  z0 = noise + mu0,  x_t = alpha_t z1 + sigma_t z0,  v = alpha'_t z1 + sigma'_t z0
linear: alpha = 1 - t, sigma = t;  cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2).

`reversed_time=True` trains a model in SiT's own convention (t = 0 noise, t = 1 data): the model sees
1 - t and predicts -v. Everything outside the model call stays in REPA's direction.
"""
from __future__ import annotations


import math
from dataclasses import dataclass

import torch

import kernels
from kernels import PATHS, path_coefficients
from engine.configurable import FromDict, finite_number, invalid

PREDICTIONS = ("v",)
WEIGHTINGS = ("uniform",)
TIME_SAMPLINGS = ("uniform", "lognormal", "shifted_lognormal")


@dataclass
class TransportConfig(FromDict):
    path: str = "linear"
    prediction: str = "v"
    weighting: str = "uniform"
    # uniform: t ~ U(0, 1). lognormal: log(sigma_t / alpha_t) ~ N(lognormal_mean, lognormal_std), which is
    # REPA's "lognormal" (t = sigmoid(n) on the linear path) at mean 0, std 1. shifted_lognormal: the same
    # with sigma_t / alpha_t multiplied by time_shift (SD3's shift; t' = s t / (1 + (s - 1) t) if linear).
    time_sampling: str = "uniform"
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    time_shift: float = 1.0
    reversed_time: bool = False
    proj_coeff: float = 0.5     # REPA's lambda
    cls_coeff: float = 0.03     # REG's class-token flow loss weight

    def __post_init__(self):
        for key, allowed in (("path", PATHS), ("prediction", PREDICTIONS), ("weighting", WEIGHTINGS),
                             ("time_sampling", TIME_SAMPLINGS)):
            if getattr(self, key) not in allowed:
                raise invalid(key, getattr(self, key), f"one of {', '.join(allowed)}")
        if not finite_number(self.lognormal_mean):
            raise invalid("lognormal_mean", self.lognormal_mean, "a finite number")
        for key in ("lognormal_std", "time_shift"):
            if not (finite_number(getattr(self, key)) and getattr(self, key) > 0):
                raise invalid(key, getattr(self, key), "a finite positive number")
        for key in ("proj_coeff", "cls_coeff"):
            if not (finite_number(getattr(self, key)) and getattr(self, key) >= 0):
                raise invalid(key, getattr(self, key), "a finite number >= 0")


def unwrap(model):
    """The nn.Module inside DDP / DeepSpeed / torch.compile wrappers (the forward is still called through
    the wrapper; methods such as car_flow_shifts are called on the inner module)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def time_from_log_snr_ratio(log_ratio: torch.Tensor, path: str) -> torch.Tensor:
    """t with log(sigma_t / alpha_t) = log_ratio."""
    if path == "linear":
        return torch.sigmoid(log_ratio)
    return (2 / math.pi) * torch.atan(torch.exp(log_ratio))


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (x.dim() - 1)))


def noise_from_velocity(v, x_t, t, path="linear", source_shift=None):
    """E[noise | x_t] from the velocity: z0 = (alpha v - alpha' x_t) / (alpha sigma' - alpha' sigma),
    then noise = z0 - mu0."""
    alpha, sigma, d_alpha, d_sigma = (expand_like(c, x_t) for c in path_coefficients(t.to(x_t.dtype), path))
    z0 = (alpha * v - d_alpha * x_t) / (alpha * d_sigma - d_alpha * sigma)
    return z0 if source_shift is None else z0 - source_shift


def score_from_velocity(v, x_t, t, path="linear", source_shift=None):
    """Score of p_t at x_t: -E[noise | x_t] / sigma_t (REPA's get_score_from_velocity without shifts)."""
    sigma = expand_like(path_coefficients(t.to(x_t.dtype), path)[1], x_t)
    return -noise_from_velocity(v, x_t, t, path, source_shift) / sigma


def data_from_velocity(v, x_t, t, path="linear", target_shift=None):
    """E[x | x_t]: z1 = (sigma' x_t - sigma v) / (alpha sigma' - alpha' sigma), then x = z1 - mu1."""
    alpha, sigma, d_alpha, d_sigma = (expand_like(c, x_t) for c in path_coefficients(t.to(x_t.dtype), path))
    z1 = (d_sigma * x_t - sigma * v) / (alpha * d_sigma - d_alpha * sigma)
    return z1 if target_shift is None else z1 - target_shift


class Transport:
    def __init__(self, cfg: TransportConfig | None = None):
        self.cfg = cfg or TransportConfig()

    def sample_time(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch,) float32 times in [0, 1] from the configured distribution."""
        cfg = self.cfg
        if cfg.time_sampling == "uniform":
            return torch.rand(batch, device=device, generator=generator)
        n = torch.randn(batch, device=device, generator=generator) * cfg.lognormal_std + cfg.lognormal_mean
        if cfg.time_sampling == "shifted_lognormal":
            n = n + math.log(cfg.time_shift)
        return time_from_log_snr_ratio(n, cfg.path)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the model sees for REPA-direction time t."""
        return 1 - t if self.cfg.reversed_time else t

    def model_velocity(self, output: torch.Tensor) -> torch.Tensor:
        """REPA-direction velocity from the model's output."""
        return -output if self.cfg.reversed_time else output

    def training_losses(self, model, x, y, z_targets=(), cls_target=None, noise=None, t=None,
                        cls_noise=None) -> dict:
        """Loss terms for a batch of latents x (B, C, H, W) with labels y (B,).

        z_targets: one (B, N, z_dim) encoder patch-token tensor per projector (no grad needed).
        cls_target: (B, z_dims[0]) encoder class token, required for a REG model: it is noised with the
        same t and its own noise (`cls_noise`, default fresh), predicted by the model, and prepended to
        z_targets[0] for alignment. t (B,) and noise default to fresh samples.
        Returns scalar tensors: "loss" = velocity + proj_coeff * alignment + cls_coeff * cls, and each term.
        """
        cfg, net = self.cfg, unwrap(model)
        B = x.shape[0]
        if t is None:
            t = self.sample_time(B, device=x.device)
        t = t.to(device=x.device, dtype=torch.float32)
        if noise is None:
            noise = torch.randn_like(x)
        z_targets = list(z_targets)
        num_projectors = len(net.projectors)
        if len(z_targets) != num_projectors:
            raise ValueError(f"got {len(z_targets)} z_targets for a model with {num_projectors} projectors "
                             f"(z_dims={net.z_dims})")
        reg = net.reg
        if reg and cls_target is None:
            raise ValueError("a REG model needs cls_target, the encoder class token (B, z_dims[0])")
        if not reg and cls_target is not None:
            raise ValueError("cls_target given for a model built without reg=True")

        # Label dropout for classifier-free guidance happens here, and only here (the model uses the labels
        # it is given): one set of (possibly dropped) labels for both the CAR-Flow shifts and the model.
        # The shifts have no loss of their own: they learn from the loss through the target and x_t.
        labels = net.drop_labels(y) if net.training else y
        mu0, mu1 = net.car_flow_shifts(labels)
        x_t, _ = kernels.interpolant(x, noise, t, cfg.path, mu0, mu1)
        time_input = self.model_time(t).to(x.dtype)
        zero = x.new_zeros((), dtype=torch.float32)

        if reg:
            cls_target = cls_target.to(x.dtype)
            cls_noise = torch.randn_like(cls_target) if cls_noise is None else cls_noise.to(cls_target.dtype)
            cls_t, _ = kernels.interpolant(cls_target, cls_noise, t, cfg.path)
            out, zs, cls_out = model(x_t, time_input, labels, cls_token=cls_t)
            cls_loss = kernels.velocity_loss(self.model_velocity(cls_out), cls_target, cls_noise, t, cfg.path)
        else:
            out, zs = model(x_t, time_input, labels)
            cls_loss = zero
        velocity = kernels.velocity_loss(self.model_velocity(out), x, noise, t, cfg.path, mu0, mu1)

        if z_targets:
            targets = [z.detach() for z in z_targets]
            if reg:
                targets[0] = torch.cat([cls_target.detach()[:, None].to(targets[0].dtype), targets[0]], dim=1)
                # Only encoder 0 has a class token; the other projectors align their patch tokens.
                zs = [zs[0]] + [z[:, 1:] for z in zs[1:]]
            for i, (p, q) in enumerate(zip(zs, targets)):
                if p.shape != q.shape:
                    raise ValueError(f"encoder {i}: projector output {tuple(p.shape)} does not match the target "
                                     f"{tuple(q.shape)} (check the encoder resolution and z_dims)")
            alignment = kernels.alignment_loss(zs, targets)
        else:
            alignment = zero
        loss = velocity + cfg.proj_coeff * alignment + cfg.cls_coeff * cls_loss
        return {"loss": loss, "velocity": velocity, "alignment": alignment, "cls": cls_loss}
