"""Samplers for SiT velocity models: Euler and Heun ODE, Euler-Maruyama SDE (REPA's g^2 = 2t).

Time runs from 1 (noise) to 0 (data) on a float64 grid; the state is kept in float64 and cast to the
model's dtype for each call. Classifier-free guidance combines the conditional and null-class halves
of one doubled batch, inside the guidance interval [low, high] of t only:
    guided = uncond + scale * (cond - uncond)                  (all channels)
    legacy_cfg=True: only the first three channels are guided, the rest use cond (DiT/SiT's original).
The ODE guides the velocity, the SDE its drift v - g^2/2 * score, as REPA does.

CAR-Flow: the start is noise + mu0(y) and the end subtracts mu1(y); the SDE's score uses each half's own
mu0 (the null class has its own shift). REG: the class token (z_dims[0] wide) is sampled jointly from
its own noise, with its own guidance scale `cls_cfg_scale` (REG's rule: a scale <= 0 uses the
conditional prediction; None: the image scale).
"""
from __future__ import annotations

import torch

import kernels

from .transport import score_from_velocity, unwrap

METHODS = ("euler", "heun", "euler_maruyama")


def _guide(cond, uncond, scale, legacy):
    guided = uncond + scale * (cond - uncond)
    if legacy and cond.dim() == 4:
        return torch.cat([guided[:, :3], cond[:, 3:]], dim=1)
    return guided


class _Drift:
    """Velocity (ODE) or SDE drift of the model at (x, t), with guidance, for state in float64."""

    def __init__(self, model, y, cfg_scale, guidance_interval, cls_cfg_scale, legacy_cfg, path, reversed_time,
                 dtype, sde):
        self.model, self.net = model, unwrap(model)
        self.y, self.cfg_scale, self.legacy = y, cfg_scale, legacy_cfg
        self.low, self.high = guidance_interval
        self.cls_cfg_scale = cfg_scale if cls_cfg_scale is None else cls_cfg_scale
        self.path, self.reversed_time, self.dtype, self.sde = path, reversed_time, dtype, sde
        self.reg = getattr(self.net, "reg", False)
        if cfg_scale > 1.0:
            null = getattr(self.net, "null_class", None)
            if null is None:
                raise ValueError("cfg_scale > 1 needs a model trained with class dropout (it has no null class)")
            self.y_pair = torch.cat([y, torch.full_like(y, null)])
        self.mu0 = self._source_shift(y)
        self.mu0_pair = self._source_shift(self.y_pair) if cfg_scale > 1.0 else None

    def guided(self, t: float) -> bool:
        return self.cfg_scale > 1.0 and self.low <= t <= self.high

    def _source_shift(self, labels):
        mu0, _ = self.net.car_flow_shifts(labels) if hasattr(self.net, "car_flow_shifts") else (None, None)
        return None if mu0 is None else mu0.to(torch.float64)

    def __call__(self, x, cls, t: float, guide_at: float | None = None):
        """Drift for state x (and REG class token cls) at time t; guidance decided at `guide_at` (t)."""
        guide = self.guided(t if guide_at is None else guide_at)
        labels = self.y_pair if guide else self.y
        x_in = torch.cat([x, x]) if guide else x
        cls_in = (torch.cat([cls, cls]) if guide else cls) if self.reg else None
        t_vec = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device)
        model_t = (1 - t_vec) if self.reversed_time else t_vec
        kwargs = {"cls_token": cls_in.to(self.dtype)} if self.reg else {}
        out = self.model(x_in.to(self.dtype), model_t.to(self.dtype), labels, **kwargs)
        sign = -1.0 if self.reversed_time else 1.0
        v = sign * out[0].to(torch.float64)
        v_cls = sign * out[2].to(torch.float64) if self.reg else None
        if self.sde:
            # drift = v - g^2 / 2 * score with g^2 = 2t
            v = v - t * score_from_velocity(v, x_in, t_vec, self.path, self.mu0_pair if guide else self.mu0)
            if self.reg:
                v_cls = v_cls - t * score_from_velocity(v_cls, cls_in, t_vec, self.path)
        if guide:
            cond, uncond = v.chunk(2)
            v = _guide(cond, uncond, self.cfg_scale, self.legacy)
            if self.reg:
                cls_cond, cls_uncond = v_cls.chunk(2)
                v_cls = (cls_uncond + self.cls_cfg_scale * (cls_cond - cls_uncond) if self.cls_cfg_scale > 0
                         else cls_cond)
        return v, v_cls


@torch.no_grad()
def sample(model, y, num_steps: int = 50, method: str = "euler", cfg_scale: float = 1.0,
           guidance_interval=(0.0, 1.0), cls_cfg_scale: float | None = None, seed: int | None = None,
           latent_shape=None, path: str = "linear", reversed_time: bool = False, legacy_cfg: bool = False,
           sde_last_t: float = 0.04, noise: torch.Tensor | None = None, cls_noise: torch.Tensor | None = None,
           dtype: torch.dtype | None = None, return_cls: bool = False, transport_cfg=None):
    """Latents (B, C, H, W) float32 for labels y (B,), integrated from t = 1 to 0.

    euler / heun: num_steps steps on linspace(1, 0) (Heun corrects every step but the last);
    euler_maruyama: REPA's grid linspace(1, sde_last_t, num_steps) then 0, noise sqrt(2t dt) per step,
    and a final noise-free mean step. `noise` (and REG's `cls_noise`) fix the start; otherwise `seed`
    makes the whole run reproducible (on the same device). `latent_shape` = (C, H, W), default the model's.
    `transport_cfg` (a TransportConfig), when given, supplies `path` and `reversed_time`.
    """
    if transport_cfg is not None:
        path, reversed_time = transport_cfg.path, transport_cfg.reversed_time
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    low, high = guidance_interval
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1, got {guidance_interval}")
    if path not in kernels.PATHS:
        raise ValueError(f"path must be one of {list(kernels.PATHS)}, got {path!r}")
    if method == "euler_maruyama" and not 0.0 < sde_last_t < 1.0:
        raise ValueError(f"sde_last_t must be in (0, 1), got {sde_last_t}")
    net = unwrap(model)
    device = y.device
    dtype = dtype or next(net.parameters()).dtype
    if latent_shape is None:
        latent_shape = (net.cfg.in_channels, net.cfg.input_size, net.cfg.input_size)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()))
    B = y.shape[0]
    if noise is None:
        noise = torch.randn((B, *latent_shape), generator=generator, device=device, dtype=torch.float64)
    x = noise.to(device=device, dtype=torch.float64)
    reg = getattr(net, "reg", False)
    cls = None
    if reg:
        if cls_noise is None:
            cls_noise = torch.randn((B, net.cls_dim), generator=generator, device=device, dtype=torch.float64)
        cls = cls_noise.to(device=device, dtype=torch.float64)

    mu0, mu1 = net.car_flow_shifts(y) if hasattr(net, "car_flow_shifts") else (None, None)
    if mu0 is not None:
        x = x + mu0.to(torch.float64)  # t = 1: alpha = 0, sigma = 1 on both paths
    drift = _Drift(model, y, cfg_scale, (low, high), cls_cfg_scale, legacy_cfg, path, reversed_time, dtype,
                   sde=method == "euler_maruyama")

    if method in ("euler", "heun"):
        t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            dt = t_next - t_cur
            d, d_cls = drift(x, cls, t_cur)
            x_next = x + dt * d
            cls_next = cls + dt * d_cls if reg else None
            if method == "heun" and i < num_steps - 1:
                # REPA decides the corrector's guidance by t_cur as well.
                d2, d2_cls = drift(x_next, cls_next, t_next, guide_at=t_cur)
                x_next = x + dt * 0.5 * (d + d2)
                cls_next = cls + dt * 0.5 * (d_cls + d2_cls) if reg else None
            x, cls = x_next, cls_next
    else:
        t_steps = torch.linspace(1, sde_last_t, num_steps, dtype=torch.float64).tolist() + [0.0]
        for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
            dt = t_next - t_cur
            d, d_cls = drift(x, cls, t_cur)
            g = (2 * t_cur) ** 0.5
            noise_x = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float64)
            x = x + dt * d + g * abs(dt) ** 0.5 * noise_x
            if reg:
                noise_cls = torch.randn(cls.shape, generator=generator, device=device, dtype=torch.float64)
                cls = cls + dt * d_cls + g * abs(dt) ** 0.5 * noise_cls
        t_cur, t_next = t_steps[-2], t_steps[-1]
        d, d_cls = drift(x, cls, t_cur)
        x = x + (t_next - t_cur) * d
        cls = cls + (t_next - t_cur) * d_cls if reg else None

    if mu1 is not None:
        x = x - mu1.to(torch.float64)
    x = x.float()
    if return_cls:
        return x, (cls.float() if reg else None)
    return x


__all__ = ["sample", "METHODS"]
