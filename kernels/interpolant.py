"""Flow-matching interpolant with CAR-Flow shifts, and the fused velocity loss.

Time direction of REPA/REG: t=0 is data, t=1 is noise.
    z1 = x + mu1            (CAR-Flow target shift, optional)
    z0 = noise + mu0        (CAR-Flow source shift, optional)
    x_t = alpha(t) z1 + sigma(t) z0
    v   = alpha'(t) z1 + sigma'(t) z0
linear: alpha = 1 - t, sigma = t            (so v = noise - x without shifts)
cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2)

Tensors are viewed as rows (B, C, S): C is the channel dimension (dim 1, for inputs of rank >= 3),
S everything after it. A shift that is constant over S, such as a per-sample per-channel (B, C, 1, 1)
shift, gets its gradient as a per-row sum inside the backward kernel (deterministic partial sums, no
atomics); any other broadcast shift gets the full gradient, summed to its shape afterwards.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _cuda
from ._autograd import fused_op
from ._backend import resolve
from ._util import (TRITON_TYPES, cdiv, compute_dtype, launch_spec, next_power_of_2, recorded_launches,
                    reduce_per_sample, tl_dtype)

# The flow paths by name: the one list the engine's configs, transport and samplers check against.
PATHS = ("linear", "cosine")
_PATH_CODES = {name: code for code, name in enumerate(PATHS)}  # the kernels' PATH constexpr


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------

def path_coefficients(t: torch.Tensor, path: str = "linear"):
    """alpha, sigma and their time derivatives for `path` at times t."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))
    raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")


def _reference_z(x, noise, t, path, source_shift, target_shift):
    dtype = compute_dtype(x, noise, t, source_shift, target_shift)
    coefficients = path_coefficients(t.to(dtype), path)
    alpha, sigma, d_alpha, d_sigma = (c.view(-1, *([1] * (x.dim() - 1))) for c in coefficients)
    z1 = x.to(dtype) if target_shift is None else x.to(dtype) + target_shift.to(dtype)
    z0 = noise.to(dtype) if source_shift is None else noise.to(dtype) + source_shift.to(dtype)
    return alpha, sigma, d_alpha, d_sigma, z1, z0


def reference_interpolant(x, noise, t, path="linear", source_shift=None, target_shift=None):
    """(x_t, v_target) in x's dtype, computed in fp32 (fp64 for fp64 inputs)."""
    alpha, sigma, d_alpha, d_sigma, z1, z0 = _reference_z(x, noise, t, path, source_shift, target_shift)
    return (alpha * z1 + sigma * z0).to(x.dtype), (d_alpha * z1 + d_sigma * z0).to(x.dtype)


def reference_velocity_loss(v_pred, x, noise, t, path="linear", source_shift=None, target_shift=None,
                            reduction="mean"):
    """Per-sample mean squared error between v_pred and v_target, then reduced over the batch."""
    _, _, d_alpha, d_sigma, z1, z0 = _reference_z(x, noise, t, path, source_shift, target_shift)
    error = v_pred.to(z1.dtype) - (d_alpha * z1 + d_sigma * z0)
    return reduce_per_sample(error.square().flatten(1).mean(1), reduction)




# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

# The cosine path's tl.cos / tl.sin (libdevice) give their kernels a 32-byte stack frame for the slow
# argument reduction (|angle| > 105615, never taken at t in [0, 1]); nothing spills, but Triton's
# `n_spills` (local memory / 4) reads 8 for it: kernels.aot.jit_build_problem tells the two apart.
@triton.jit
def _path_coefficients(t, PATH: tl.constexpr):
    if PATH == 0:
        alpha = 1.0 - t
        sigma = t
        d_alpha = t * 0.0 - 1.0
        d_sigma = t * 0.0 + 1.0
    else:
        angle = t * 1.5707963267948966
        alpha = tl.cos(angle)
        sigma = tl.sin(angle)
        d_alpha = -1.5707963267948966 * sigma
        d_sigma = 1.5707963267948966 * alpha
    return alpha, sigma, d_alpha, d_sigma


@triton.jit
def _program_rows(t_ptr, C, S, PATH: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's row (b, c) of the (B, C, S) view, its block of S, and the path coefficients."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = row // C
    s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    t = tl.load(t_ptr + b).to(COMPUTE)
    alpha, sigma, d_alpha, d_sigma = _path_coefficients(t, PATH)
    return row, blk, b, row % C, s, s < S, alpha, sigma, d_alpha, d_sigma


@triton.jit
def _load_z(x_ptr, noise_ptr, mu0_ptr, mu1_ptr, b, c, s, mask,
            stride_x_b, stride_x_c, stride_x_s, stride_noise_b, stride_noise_c, stride_noise_s, stride_mu0_b,
            stride_mu0_c, stride_mu0_s, stride_mu1_b, stride_mu1_c, stride_mu1_s,
            HAS_MU0: tl.constexpr, HAS_MU1: tl.constexpr, COMPUTE: tl.constexpr):
    z1 = tl.load(x_ptr + b * stride_x_b + c * stride_x_c + s * stride_x_s, mask=mask, other=0.0).to(COMPUTE)
    z0 = tl.load(noise_ptr + b * stride_noise_b + c * stride_noise_c + s * stride_noise_s,
                 mask=mask, other=0.0).to(COMPUTE)
    if HAS_MU1:
        z1 += tl.load(mu1_ptr + b * stride_mu1_b + c * stride_mu1_c + s * stride_mu1_s,
                      mask=mask, other=0.0).to(COMPUTE)
    if HAS_MU0:
        z0 += tl.load(mu0_ptr + b * stride_mu0_b + c * stride_mu0_c + s * stride_mu0_s,
                      mask=mask, other=0.0).to(COMPUTE)
    return z1, z0


@triton.jit
def _store_z_grads(dz1, dz0, row, blk, s, mask, S, num_blocks,
                   dz1_ptr, dz0_ptr, dz1_rows_ptr, dz0_rows_ptr,
                   DZ1_FULL: tl.constexpr, DZ0_FULL: tl.constexpr,
                   DZ1_ROWS: tl.constexpr, DZ0_ROWS: tl.constexpr):
    # Full gradients are (B, C, S), row partial sums (B * C, num_blocks), both in the compute dtype.
    if DZ1_FULL:
        tl.store(dz1_ptr + row * S + s, dz1, mask=mask)
    if DZ0_FULL:
        tl.store(dz0_ptr + row * S + s, dz0, mask=mask)
    if DZ1_ROWS:
        tl.store(dz1_rows_ptr + row * num_blocks + blk, tl.sum(tl.where(mask, dz1, 0.0), axis=0))
    if DZ0_ROWS:
        tl.store(dz0_rows_ptr + row * num_blocks + blk, tl.sum(tl.where(mask, dz0, 0.0), axis=0))


@triton.jit
def _interpolant_fwd_kernel(
    x_ptr, noise_ptr, t_ptr, mu0_ptr, mu1_ptr, xt_ptr, v_ptr,
    C, S,
    stride_x_b, stride_x_c, stride_x_s, stride_noise_b, stride_noise_c, stride_noise_s, stride_mu0_b, stride_mu0_c,
    stride_mu0_s, stride_mu1_b, stride_mu1_c, stride_mu1_s,
    PATH: tl.constexpr, HAS_MU0: tl.constexpr, HAS_MU1: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row, blk, b, c, s, mask, alpha, sigma, d_alpha, d_sigma = _program_rows(t_ptr, C, S, PATH, COMPUTE, BLOCK_S)
    z1, z0 = _load_z(x_ptr, noise_ptr, mu0_ptr, mu1_ptr, b, c, s, mask,
                     stride_x_b, stride_x_c, stride_x_s, stride_noise_b, stride_noise_c, stride_noise_s,
                     stride_mu0_b, stride_mu0_c, stride_mu0_s, stride_mu1_b, stride_mu1_c, stride_mu1_s,
                     HAS_MU0, HAS_MU1, COMPUTE)
    out = row * S + s
    tl.store(xt_ptr + out, (alpha * z1 + sigma * z0).to(xt_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + out, (d_alpha * z1 + d_sigma * z0).to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _interpolant_bwd_kernel(
    g_xt_ptr, g_v_ptr, t_ptr, dz1_ptr, dz0_ptr, dz1_rows_ptr, dz0_rows_ptr,
    C, S, num_blocks,
    PATH: tl.constexpr, HAS_G_XT: tl.constexpr, HAS_G_V: tl.constexpr,
    DZ1_FULL: tl.constexpr, DZ0_FULL: tl.constexpr, DZ1_ROWS: tl.constexpr, DZ0_ROWS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row, blk, b, c, s, mask, alpha, sigma, d_alpha, d_sigma = _program_rows(t_ptr, C, S, PATH, COMPUTE, BLOCK_S)
    dz1 = tl.zeros([BLOCK_S], dtype=COMPUTE)
    dz0 = tl.zeros([BLOCK_S], dtype=COMPUTE)
    if HAS_G_XT:  # gradients arrive contiguous (B, C, S)
        g_xt = tl.load(g_xt_ptr + row * S + s, mask=mask, other=0.0).to(COMPUTE)
        dz1 += alpha * g_xt
        dz0 += sigma * g_xt
    if HAS_G_V:
        g_v = tl.load(g_v_ptr + row * S + s, mask=mask, other=0.0).to(COMPUTE)
        dz1 += d_alpha * g_v
        dz0 += d_sigma * g_v
    _store_z_grads(dz1, dz0, row, blk, s, mask, S, num_blocks, dz1_ptr, dz0_ptr, dz1_rows_ptr,
                   dz0_rows_ptr, DZ1_FULL, DZ0_FULL, DZ1_ROWS, DZ0_ROWS)


@triton.jit
def _velocity_error(
    v_pred_ptr, x_ptr, noise_ptr, t_ptr, mu0_ptr, mu1_ptr, C, S,
    stride_v_pred_b, stride_v_pred_c, stride_v_pred_s, stride_x_b, stride_x_c, stride_x_s, stride_noise_b,
    stride_noise_c, stride_noise_s, stride_mu0_b, stride_mu0_c, stride_mu0_s, stride_mu1_b, stride_mu1_c,
    stride_mu1_s,
    PATH: tl.constexpr, HAS_MU0: tl.constexpr, HAS_MU1: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """This program's block of one (b, c) row: where it lies (row, block, b, offsets, mask), the path's
    d_alpha and d_sigma at t[b], and the
    prediction's error v_pred - v_target (masked lanes hold garbage)."""
    row, blk, b, c, s, mask, alpha, sigma, d_alpha, d_sigma = _program_rows(t_ptr, C, S, PATH, COMPUTE, BLOCK_S)
    z1, z0 = _load_z(x_ptr, noise_ptr, mu0_ptr, mu1_ptr, b, c, s, mask,
                     stride_x_b, stride_x_c, stride_x_s, stride_noise_b, stride_noise_c, stride_noise_s,
                     stride_mu0_b, stride_mu0_c, stride_mu0_s, stride_mu1_b, stride_mu1_c, stride_mu1_s,
                     HAS_MU0, HAS_MU1, COMPUTE)
    v_pred = tl.load(v_pred_ptr + b * stride_v_pred_b + c * stride_v_pred_c + s * stride_v_pred_s,
                     mask=mask, other=0.0).to(COMPUTE)
    return row, blk, b, s, mask, d_alpha, d_sigma, v_pred - (d_alpha * z1 + d_sigma * z0)


@triton.jit
def _velocity_loss_fwd_kernel(
    v_pred_ptr, x_ptr, noise_ptr, t_ptr, mu0_ptr, mu1_ptr, partial_ptr,
    C, S, num_blocks,
    stride_v_pred_b, stride_v_pred_c, stride_v_pred_s, stride_x_b, stride_x_c, stride_x_s, stride_noise_b,
    stride_noise_c, stride_noise_s, stride_mu0_b, stride_mu0_c, stride_mu0_s, stride_mu1_b, stride_mu1_c,
    stride_mu1_s,
    PATH: tl.constexpr, HAS_MU0: tl.constexpr, HAS_MU1: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row, blk, b, s, mask, d_alpha, d_sigma, error = _velocity_error(
        v_pred_ptr, x_ptr, noise_ptr, t_ptr, mu0_ptr, mu1_ptr, C, S,
        stride_v_pred_b, stride_v_pred_c, stride_v_pred_s, stride_x_b, stride_x_c, stride_x_s, stride_noise_b,
        stride_noise_c, stride_noise_s, stride_mu0_b, stride_mu0_c, stride_mu0_s, stride_mu1_b, stride_mu1_c,
        stride_mu1_s, PATH, HAS_MU0, HAS_MU1, COMPUTE, BLOCK_S)
    error = tl.where(mask, error, 0.0)
    tl.store(partial_ptr + row * num_blocks + blk, tl.sum(error * error, axis=0))


@triton.jit
def _velocity_loss_bwd_kernel(
    v_pred_ptr, x_ptr, noise_ptr, t_ptr, mu0_ptr, mu1_ptr, scale_ptr,
    d_v_pred_ptr, dz1_ptr, dz0_ptr, dz1_rows_ptr, dz0_rows_ptr,
    C, S, num_blocks,
    stride_v_pred_b, stride_v_pred_c, stride_v_pred_s, stride_x_b, stride_x_c, stride_x_s, stride_noise_b,
    stride_noise_c, stride_noise_s, stride_mu0_b, stride_mu0_c, stride_mu0_s, stride_mu1_b, stride_mu1_c,
    stride_mu1_s,
    PATH: tl.constexpr, HAS_MU0: tl.constexpr, HAS_MU1: tl.constexpr, D_V_PRED: tl.constexpr,
    DZ1_FULL: tl.constexpr, DZ0_FULL: tl.constexpr, DZ1_ROWS: tl.constexpr, DZ0_ROWS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row, blk, b, s, mask, d_alpha, d_sigma, error = _velocity_error(
        v_pred_ptr, x_ptr, noise_ptr, t_ptr, mu0_ptr, mu1_ptr, C, S,
        stride_v_pred_b, stride_v_pred_c, stride_v_pred_s, stride_x_b, stride_x_c, stride_x_s, stride_noise_b,
        stride_noise_c, stride_noise_s, stride_mu0_b, stride_mu0_c, stride_mu0_s, stride_mu1_b, stride_mu1_c,
        stride_mu1_s, PATH, HAS_MU0, HAS_MU1, COMPUTE, BLOCK_S)
    scale = tl.load(scale_ptr + b).to(COMPUTE)  # d loss / d per-sample loss * 2 / (C * S)
    d_v_pred = scale * error
    if D_V_PRED:
        tl.store(d_v_pred_ptr + row * S + s, d_v_pred.to(d_v_pred_ptr.dtype.element_ty), mask=mask)
    _store_z_grads(-d_alpha * d_v_pred, -d_sigma * d_v_pred, row, blk, s, mask, S, num_blocks,
                   dz1_ptr, dz0_ptr, dz1_rows_ptr, dz0_rows_ptr, DZ1_FULL, DZ0_FULL, DZ1_ROWS, DZ0_ROWS)


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------

def _rows_view(x: torch.Tensor):
    """(B, C, S) sizes of x: C is dim 1 for rank >= 3, else 1."""
    batch = x.shape[0]
    channels = x.shape[1] if x.dim() >= 3 else 1
    return batch, channels, x.numel() // max(batch * channels, 1)


def _as_rows(tensor: torch.Tensor | None, shape, rows):
    """`tensor` broadcast to `shape` and viewed as (B, C, S) (a view whenever strides allow)."""
    if tensor is None:
        return None
    return tensor.expand(shape).reshape(rows)


def _strides(tensor):
    return tuple(tensor.stride()) if tensor is not None else (0, 0, 0)


def _block_s(rows: int, S: int) -> int:
    # At least ~1024 programs so that small latents still fill an H100's 132 SMs; at most 1024 lanes.
    block = min(1024, next_power_of_2(S))
    while block > 128 and rows * cdiv(S, block) < 1024:
        block //= 2
    return block


class _ShiftGrads:
    """Where a backward kernel puts the gradient of z1 (or z0), and how that becomes the gradients of
    x (or noise) and of its shift."""

    def __init__(self, base, shift, need_base: bool, need_shift: bool, num_blocks: int, dtype):
        B, C, S = self.rows_view = _rows_view(base)
        self.base_shape, self.base_dtype = base.shape, base.dtype
        self.shift_shape = shift.shape if shift is not None else None
        self.shift_dtype = shift.dtype if shift is not None else None
        self.need_base, self.need_shift = need_base, need_shift and shift is not None
        # a shift constant over S (per channel, per sample, ...) is summed per row inside the kernel
        self.rows_mode = (self.need_shift and S > 1
                          and _as_rows(shift, base.shape, (B, C, S)).stride(2) == 0)
        self.full_mode = need_base or (self.need_shift and not self.rows_mode)
        self.full = torch.empty((B, C, S), dtype=dtype, device=base.device) if self.full_mode else None
        self.rows = (torch.empty((B * C, num_blocks), dtype=dtype, device=base.device)
                     if self.rows_mode else None)

    def grads(self):
        d_base = d_shift = None
        if self.full_mode:
            full = self.full.view(self.base_shape)
            if self.need_base:
                d_base = full.to(self.base_dtype)
            if self.need_shift and not self.rows_mode:
                d_shift = full.sum_to_size(self.shift_shape).to(self.shift_dtype)
        if self.rows_mode:
            B, C, _ = self.rows_view
            per_row = self.rows.sum(1).view((B, C) + (1,) * (len(self.base_shape) - 2))
            if len(self.base_shape) < 3:
                per_row = per_row.view(B, 1)
            d_shift = per_row.sum_to_size(self.shift_shape).to(self.shift_dtype)
        return d_base, d_shift


def _interpolant_forward(x, noise, t, source_shift, target_shift, path):
    if _cuda.supports_flow("interpolant", x, noise, t, source_shift, target_shift):  # set_backend("cuda")
        return _cuda.interpolant_forward(x, noise, t, source_shift, target_shift, path)
    B, C, S = rows_view = _rows_view(x)
    x3, n3 = x.reshape(rows_view), noise.reshape(rows_view)
    mu0, mu1 = _as_rows(source_shift, x.shape, rows_view), _as_rows(target_shift, x.shape, rows_view)
    x_t = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    v = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = _block_s(B * C, S)
    _interpolant_fwd_kernel[(B * C, cdiv(S, block))](
        x3, n3, t, mu0 if mu0 is not None else x3, mu1 if mu1 is not None else x3, x_t, v, C, S,
        *x3.stride(), *n3.stride(), *_strides(mu0), *_strides(mu1),
        PATH=_PATH_CODES[path], HAS_MU0=mu0 is not None, HAS_MU1=mu1 is not None,
        COMPUTE=tl_dtype(compute_dtype(x, noise, source_shift, target_shift)), BLOCK_S=block)
    return x_t, v


def _interpolant_backward(g_xt, g_v, t, x, noise, source_shift, target_shift, path, needs):
    """Gradients (d_x, d_noise, d_source_shift, d_target_shift), None where `needs` is False."""
    B, C, S = _rows_view(x)
    cuda = _cuda.supports_interpolant_backward(g_xt, g_v)  # set_backend("cuda")
    block = _block_s(B * C, S)
    num_blocks = _cuda.flow_chunks(x.device, B * C, S) if cuda else cdiv(S, block)
    compute = compute_dtype(x, noise, source_shift, target_shift)
    z1 = _ShiftGrads(x, target_shift, needs[0], needs[3], num_blocks, compute)
    z0 = _ShiftGrads(noise, source_shift, needs[1], needs[2], num_blocks, compute)
    if not (z1.full_mode or z1.rows_mode or z0.full_mode or z0.rows_mode) or (g_xt is None and g_v is None):
        return None, None, None, None
    if cuda:
        _cuda.interpolant_backward(g_xt, g_v, t, (B, C, S), path, z1.full, z0.full, z1.rows, z0.rows)
        d_x, d_mu1 = z1.grads()
        d_noise, d_mu0 = z0.grads()
        return d_x, d_noise, d_mu0, d_mu1
    g_xt = g_xt.contiguous() if g_xt is not None else None
    g_v = g_v.contiguous() if g_v is not None else None
    any_g = g_xt if g_xt is not None else g_v
    _interpolant_bwd_kernel[(B * C, num_blocks)](
        g_xt if g_xt is not None else any_g, g_v if g_v is not None else any_g, t,
        z1.full if z1.full is not None else t, z0.full if z0.full is not None else t,
        z1.rows if z1.rows is not None else t, z0.rows if z0.rows is not None else t,
        C, S, num_blocks,
        PATH=_PATH_CODES[path], HAS_G_XT=g_xt is not None, HAS_G_V=g_v is not None,
        DZ1_FULL=z1.full_mode, DZ0_FULL=z0.full_mode, DZ1_ROWS=z1.rows_mode, DZ0_ROWS=z0.rows_mode,
        COMPUTE=tl_dtype(compute), BLOCK_S=block)
    d_x, d_mu1 = z1.grads()
    d_noise, d_mu0 = z0.grads()
    return d_x, d_noise, d_mu0, d_mu1


def _velocity_loss_forward(v_pred, x, noise, t, source_shift, target_shift, path):
    B, C, S = rows_view = _rows_view(x)
    if _cuda.supports_flow("velocity_loss", x, noise, t, source_shift, target_shift, v_pred):  # set_backend("cuda")
        partial = _cuda.velocity_forward(v_pred, x, noise, t, source_shift, target_shift, path)
        return partial.view(B, -1).sum(1) / (C * S)
    v3, x3, n3 = v_pred.reshape(rows_view), x.reshape(rows_view), noise.reshape(rows_view)
    mu0, mu1 = _as_rows(source_shift, x.shape, rows_view), _as_rows(target_shift, x.shape, rows_view)
    block = _block_s(B * C, S)
    num_blocks = cdiv(S, block)
    compute = compute_dtype(v_pred, x, noise, source_shift, target_shift)
    partial = torch.empty((B * C, num_blocks), dtype=compute, device=x.device)
    _velocity_loss_fwd_kernel[(B * C, num_blocks)](
        v3, x3, n3, t, mu0 if mu0 is not None else x3, mu1 if mu1 is not None else x3, partial,
        C, S, num_blocks,
        *v3.stride(), *x3.stride(), *n3.stride(), *_strides(mu0), *_strides(mu1),
        PATH=_PATH_CODES[path], HAS_MU0=mu0 is not None, HAS_MU1=mu1 is not None,
        COMPUTE=tl_dtype(compute), BLOCK_S=block)
    return partial.view(B, C * num_blocks).sum(1) / (C * S)


def _velocity_loss_backward(g_loss, v_pred, x, noise, t, source_shift, target_shift, path, needs):
    """Gradients (d_v_pred, d_x, d_noise, d_source_shift, d_target_shift), None where not needed."""
    B, C, S = rows_view = _rows_view(x)
    cuda = _cuda.supports_flow("velocity_loss", x, noise, t, source_shift, target_shift, v_pred)
    block = _block_s(B * C, S)
    num_blocks = _cuda.flow_chunks(x.device, B * C, S) if cuda else cdiv(S, block)
    compute = compute_dtype(v_pred, x, noise, source_shift, target_shift)
    v3, x3, n3 = v_pred.reshape(rows_view), x.reshape(rows_view), noise.reshape(rows_view)
    mu0, mu1 = _as_rows(source_shift, x.shape, rows_view), _as_rows(target_shift, x.shape, rows_view)
    z1 = _ShiftGrads(x, target_shift, needs[1], needs[4], num_blocks, compute)
    z0 = _ShiftGrads(noise, source_shift, needs[2], needs[3], num_blocks, compute)
    d_v_pred = torch.empty(x.shape, dtype=v_pred.dtype, device=x.device) if needs[0] else None
    scale = (g_loss.to(compute) * (2.0 / (C * S))).contiguous()  # d loss / d per-sample mean, times 2/M
    if cuda:  # set_backend("cuda")
        _cuda.velocity_backward(v_pred, x, noise, t, source_shift, target_shift, path, scale, d_v_pred, z1.full,
                                z0.full, z1.rows, z0.rows)
        d_x, d_mu1 = z1.grads()
        d_noise, d_mu0 = z0.grads()
        return d_v_pred, d_x, d_noise, d_mu0, d_mu1
    _velocity_loss_bwd_kernel[(B * C, num_blocks)](
        v3, x3, n3, t, mu0 if mu0 is not None else x3, mu1 if mu1 is not None else x3, scale,
        d_v_pred if d_v_pred is not None else scale,
        z1.full if z1.full is not None else scale, z0.full if z0.full is not None else scale,
        z1.rows if z1.rows is not None else scale, z0.rows if z0.rows is not None else scale,
        C, S, num_blocks,
        *v3.stride(), *x3.stride(), *n3.stride(), *_strides(mu0), *_strides(mu1),
        PATH=_PATH_CODES[path], HAS_MU0=mu0 is not None, HAS_MU1=mu1 is not None,
        D_V_PRED=d_v_pred is not None,
        DZ1_FULL=z1.full_mode, DZ0_FULL=z0.full_mode, DZ1_ROWS=z1.rows_mode, DZ0_ROWS=z0.rows_mode,
        COMPUTE=tl_dtype(compute), BLOCK_S=block)
    d_x, d_mu1 = z1.grads()
    d_noise, d_mu0 = z0.grads()
    return d_v_pred, d_x, d_noise, d_mu0, d_mu1


# One registration per op (kernels._autograd): the eager autograd.Function and the torch.compile
# custom op both run these. t gets no gradient (the public functions fall back when it needs one).

def _interpolant_op_forward(x: Tensor, noise: Tensor, t: Tensor, source_shift: Optional[Tensor],
                            target_shift: Optional[Tensor], path: str) -> tuple[Tensor, Tensor]:
    return _interpolant_forward(x, noise, t, source_shift, target_shift, path)


def _interpolant_op_backward(saved, grads, needs, path):
    x, noise, t, mu0, mu1 = saved
    n = needs
    d_x, d_noise, d_mu0, d_mu1 = _interpolant_backward(*grads, t, x, noise, mu0, mu1, path, (n[0], n[1], n[3], n[4]))
    return [d_x, d_noise, None, d_mu0, d_mu1]


def _fake_input_grads(saved, needs, differentiable):
    return [ref.new_empty(ref.shape) if need and ok and ref is not None else None
            for ref, need, ok in zip(saved, needs, differentiable)]


_interpolant = fused_op(
    "alignflow::interpolant", forward=_interpolant_op_forward, backward=_interpolant_op_backward,
    save=lambda inputs, results: inputs[:5],
    fake_forward=lambda x, noise, t, source_shift, target_shift, path: (x.new_empty(x.shape), x.new_empty(x.shape)),
    fake_backward=lambda saved, grads, needs, path: _fake_input_grads(saved, needs, (1, 1, 0, 1, 1)),
    num_outputs=2)


def _velocity_loss_op_forward(v_pred: Tensor, x: Tensor, noise: Tensor, t: Tensor, source_shift: Optional[Tensor],
                              target_shift: Optional[Tensor], path: str) -> Tensor:
    return _velocity_loss_forward(v_pred, x, noise, t, source_shift, target_shift, path)


def _velocity_loss_op_backward(saved, grads, needs, path):
    v_pred, x, noise, t, mu0, mu1 = saved
    n = needs
    d_v, d_x, d_noise, d_mu0, d_mu1 = _velocity_loss_backward(
        grads[0], v_pred, x, noise, t, mu0, mu1, path, (n[0], n[1], n[2], n[4], n[5]))
    return [d_v, d_x, d_noise, None, d_mu0, d_mu1]


_velocity_loss = fused_op(
    "alignflow::velocity_loss", forward=_velocity_loss_op_forward, backward=_velocity_loss_op_backward,
    save=lambda inputs, results: inputs[:6],
    fake_forward=lambda v_pred, x, noise, t, source_shift, target_shift, path: x.new_empty(
        (x.shape[0],), dtype=compute_dtype(v_pred, x, noise, source_shift, target_shift)),
    fake_backward=lambda saved, grads, needs, path: _fake_input_grads(saved, needs, (1, 1, 1, 0, 1, 1)))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check(x, noise, t, path, source_shift, target_shift, v_pred=None):
    if path not in PATHS:
        raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")
    if noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal x shape {tuple(x.shape)}")
    if v_pred is not None and v_pred.shape != x.shape:
        raise ValueError(f"v_pred shape {tuple(v_pred.shape)} must equal x shape {tuple(x.shape)}")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    for name, shift in (("source_shift", source_shift), ("target_shift", target_shift)):
        if shift is not None:
            shape = _broadcast_shape(shift.shape, x.shape)
            if shape is None:
                raise ValueError(f"{name} shape {tuple(shift.shape)} does not broadcast to x shape "
                                 f"{tuple(x.shape)}")
            if shape != tuple(x.shape):
                raise ValueError(f"{name} shape {tuple(shift.shape)} would enlarge x shape {tuple(x.shape)}")


def _broadcast_shape(a, b):
    """The broadcast of shapes a and b, or None where they do not broadcast: torch.broadcast_shapes'
    rule in plain Python (torch's own goes through symbolic-shape checks: 75 us of host time per eager
    interpolant call on the CPU, bench.wrapper_overhead)."""
    n = max(len(a), len(b))
    out = []
    for p, q in zip((1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)):
        if p != q and p != 1 and q != 1:
            return None
        out.append(q if p == 1 else p)
    return tuple(out)


def _backend(op, x, noise, t, source_shift, target_shift, v_pred=None):
    from ._backend import fallback

    if t.requires_grad:
        return fallback(op, "t requires grad; the kernel gives no gradient to t")
    if x.numel() == 0:
        return fallback(op, "empty input")
    return resolve(op, (x, noise, t, source_shift, target_shift, v_pred),
                   dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16))


def interpolant(x, noise, t, path="linear", source_shift=None, target_shift=None):
    """x_t and v_target of the flow path at times t (B,), with optional CAR-Flow shifts."""
    _check(x, noise, t, path, source_shift, target_shift)
    if _backend("interpolant", x, noise, t, source_shift, target_shift) == "torch":
        return reference_interpolant(x, noise, t, path, source_shift, target_shift)
    return _interpolant(x, noise, t.contiguous(), source_shift, target_shift, path)


def velocity_loss(v_pred, x, noise, t, path="linear", source_shift=None, target_shift=None, reduction="mean"):
    """Mean squared error of v_pred against v_target per sample, fused so v_target is never stored."""
    _check(x, noise, t, path, source_shift, target_shift, v_pred)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if _backend("velocity_loss", x, noise, t, source_shift, target_shift, v_pred) == "torch":
        return reference_velocity_loss(v_pred, x, noise, t, path, source_shift, target_shift, reduction)
    per_sample = _velocity_loss(v_pred, x, noise, t.contiguous(), source_shift, target_shift, path)
    return reduce_per_sample(per_sample, reduction)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)
# ----------------------------------------------------------------------------------------------

def aot_specs():
    """The launches of a SiT-XL/2 step, recorded from the launchers: latents (32, 4, 32, 32) in bf16
    and fp32 on both paths, with CAR-Flow's per-channel source shift (B, C, 1, 1: stride 0) and a full
    target shift, every gradient a training step takes (v_pred, both shifts; x and noise need none).
    128 rows of 1024 get blocks of 128 (a 256 KB tensor: launch-bound, not bandwidth-bound, so no
    vector width is asked for)."""
    module = sys.modules[__name__]
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        x, noise, v_pred, target_shift = (torch.empty(32, 4, 32, 32, dtype=dtype, device="meta") for _ in range(4))
        source_shift = torch.empty(32, 4, 1, 1, dtype=dtype, device="meta")
        t = torch.empty(32, device="meta")
        shifts = (source_shift, target_shift)
        for path in PATHS:
            with recorded_launches(module) as launches:
                _interpolant_forward(x, noise, t, *shifts, path)
                _velocity_loss_forward(v_pred, x, noise, t, *shifts, path)
                _velocity_loss_backward(torch.empty(32, device="meta"), v_pred, x, noise, t, *shifts, path,
                                        needs=(True, False, False, True, True))
                _interpolant_backward(torch.empty_like(x), torch.empty_like(x), t, x, noise, *shifts, path,
                                      needs=(False, False, True, True))
            tag = f"[{TRITON_TYPES[dtype]},path={_PATH_CODES[path]}]"
            specs += [launch_spec(f"{op}{tag}", launch) for op, launch in zip(
                ("interpolant_fwd", "velocity_loss_fwd", "velocity_loss_bwd", "interpolant_bwd"), launches)]
    return specs
