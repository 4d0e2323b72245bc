"""adaLN-Zero glue of a SiT block: LayerNorm (no affine) + modulate, and gated residual + the same.

    adaln_modulate(x, shift, scale)               y = LN(x) * (1 + scale) + shift
    adaln_residual_modulate(x, h, gate, shift, scale, eps, bias)
                                                  x_new = x + gate * (h + bias);  y = LN(x_new) * (1 + scale) + shift

x, h: (B, N, D); shift, scale, gate: (B, D) or (B, 1, D), one modulation vector per sample; bias: (D,) or
None, the bias of the Linear that made h (h computed without it). With a bias its gradient comes out of
the backward pass that already forms dL/dh = gate * dL/dx_new per row: nn.Linear's separate sum of
dL/dh over all B * N rows is gone.
LN is nn.LayerNorm(D, elementwise_affine=False, eps) with statistics in fp32 (fp64 for fp64 inputs).

Dtypes: x_new has x's dtype (so the residual stream may be kept in fp32 while h, gate and the
modulation are bf16); y has the modulation's dtype (promotion of shift's and scale's), which is x's
dtype when all inputs share one. The LayerNorm of the residual op normalises x_new as stored, i.e.
after rounding to x's dtype, so forward and backward see the same x_new. Its backward uses the saved
x_new output: modifying x_new in place before backward is an autograd error (SiT writes x = x + ...).

Kernels. Forward: one program normalises BLOCK_R whole rows (BLOCK_D = next power of two >= D lanes,
the row lives in registers, so x is read once) of ONE sample: the grid is (B, ceil(N / BLOCK_R)) and
a row block never straddles two samples, so every row uses its own sample's shift/scale/gate, loaded
once per program. Mean and rstd are stored in fp32 (B, N); normalised values are recomputed in the
backward. Backward: grid (B, tiles); a program walks `blocks_per_tile` row blocks of its sample and
accumulates d_shift, d_scale and d_gate (and d_bias) over its rows in registers, then writes one partial
sum per (sample, tile) to a buffer that torch sums over the tiles (and, for d_bias, the samples): no
atomics, so the result is bitwise deterministic for a given shape.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _cuda
from ._autograd import fused_op
from ._backend import fallback, resolve
from ._util import TRITON_TYPES, cdiv, compute_dtype, launch_spec, next_power_of_2, recorded_launches, tl_dtype

# Widest row kept in registers; wider rows would spill, so they fall back to the reference
# (kernels/TUNING.md).
MAX_D = 4096


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------

def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(1) if v.dim() == 2 else v  # (B, D) -> (B, 1, D)


def _modulation_dtype(shift: torch.Tensor, scale: torch.Tensor) -> torch.dtype:
    return torch.promote_types(shift.dtype, scale.dtype)


def reference_adaln_modulate(x, shift, scale, eps=1e-6):
    """y = LayerNorm(x) * (1 + scale) + shift, computed in fp32 (fp64 for fp64 inputs)."""
    dtype = compute_dtype(x, shift, scale)
    x_hat = F.layer_norm(x.to(dtype), (x.shape[-1],), eps=eps)
    y = x_hat * (1 + _per_sample(scale).to(dtype)) + _per_sample(shift).to(dtype)
    return y.to(_modulation_dtype(shift, scale))


def reference_adaln_residual_modulate(x, h, gate, shift, scale, eps=1e-6, bias=None):
    """x_new = x + gate * (h + bias) in x's dtype (no bias: x + gate * h), then
    y = adaln_modulate(x_new, shift, scale)."""
    dtype = compute_dtype(x, h, gate, bias)
    branch = h.to(dtype) if bias is None else h.to(dtype) + bias.to(dtype)
    x_new = (x.to(dtype) + _per_sample(gate).to(dtype) * branch).to(x.dtype)
    return x_new, reference_adaln_modulate(x_new, shift, scale, eps)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _adaln_fwd_kernel(
    x_ptr, h_ptr, gate_ptr, shift_ptr, scale_ptr, bias_ptr, x_new_ptr, y_ptr, mean_ptr, rstd_ptr,
    N, D, eps,
    stride_x_b, stride_x_n, stride_x_d, stride_h_b, stride_h_n, stride_h_d,
    stride_gate_b, stride_gate_d, stride_shift_b, stride_shift_d, stride_scale_b, stride_scale_d, stride_bias_d,
    RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_mask = n < N
    col_mask = d < D
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + b * stride_x_b + n[:, None] * stride_x_n + d[None, :] * stride_x_d,
                mask=mask, other=0.0).to(COMPUTE)
    out = (b * N + n[:, None]) * D + d[None, :]  # outputs are contiguous (B, N, D)
    if RESIDUAL:
        h = tl.load(h_ptr + b * stride_h_b + n[:, None] * stride_h_n + d[None, :] * stride_h_d,
                    mask=mask, other=0.0).to(COMPUTE)
        if HAS_BIAS:
            h += tl.load(bias_ptr + d * stride_bias_d, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
        gate = tl.load(gate_ptr + b * stride_gate_b + d * stride_gate_d, mask=col_mask, other=0.0).to(COMPUTE)
        x_new = (x + gate[None, :] * h).to(x_new_ptr.dtype.element_ty)
        tl.store(x_new_ptr + out, x_new, mask=mask)
        x = x_new.to(COMPUTE)  # normalise x_new as stored, as the backward will read it
    mean = tl.sum(x, axis=1) / D
    centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(shift_ptr + b * stride_shift_b + d * stride_shift_d, mask=col_mask, other=0.0).to(COMPUTE)
    scale = tl.load(scale_ptr + b * stride_scale_b + d * stride_scale_d, mask=col_mask, other=0.0).to(COMPUTE)
    y = centered * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + b * N + n, mean, mask=row_mask)
    tl.store(rstd_ptr + b * N + n, rstd, mask=row_mask)


@triton.jit
def _adaln_bwd_kernel(
    x_ptr, h_ptr, gate_ptr, scale_ptr, bias_ptr, mean_ptr, rstd_ptr, dy_ptr, g_x_new_ptr,
    dx_ptr, dh_ptr, partial_ptr,
    N, D, blocks_per_tile,
    stride_x_b, stride_x_n, stride_x_d, stride_h_b, stride_h_n, stride_h_d,
    stride_gate_b, stride_gate_d, stride_scale_b, stride_scale_d, stride_bias_d,
    stride_dy_b, stride_dy_n, stride_dy_d, stride_g_x_new_b, stride_g_x_new_n, stride_g_x_new_d,
    RESIDUAL: tl.constexpr, HAS_G_X_NEW: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DH: tl.constexpr,
    MODULATION_GRADS: tl.constexpr, GATE_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    PARTIAL_ROWS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # x_ptr is the normalised input: x for adaln_modulate, the saved x_new for the residual op.
    # With a bias the branch is h + bias: d_bias = sum over rows of dL/dh = gate * dx and d_gate = sum of
    # dx * (h + bias) = sum dx * h + bias * sum dx. gate and bias are one vector per tile, so only the
    # rows' dx are summed in the loop (one register vector), and gate and bias applied once per tile.
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    col_mask = d < D
    scale = tl.load(scale_ptr + b * stride_scale_b + d * stride_scale_d, mask=col_mask, other=0.0).to(COMPUTE)
    if RESIDUAL:
        gate = tl.load(gate_ptr + b * stride_gate_b + d * stride_gate_d, mask=col_mask, other=0.0).to(COMPUTE)
    d_shift = tl.zeros([BLOCK_D], dtype=COMPUTE)
    d_scale = tl.zeros([BLOCK_D], dtype=COMPUTE)
    d_gate = tl.zeros([BLOCK_D], dtype=COMPUTE)
    sum_dx = tl.zeros([BLOCK_D], dtype=COMPUTE)
    for i in range(0, blocks_per_tile):
        n = (tile * blocks_per_tile + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = n < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + b * stride_x_b + n[:, None] * stride_x_n + d[None, :] * stride_x_d,
                    mask=mask, other=0.0).to(COMPUTE)
        mean = tl.load(mean_ptr + b * N + n, mask=row_mask, other=0.0).to(COMPUTE)
        rstd = tl.load(rstd_ptr + b * N + n, mask=row_mask, other=0.0).to(COMPUTE)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + b * stride_dy_b + n[:, None] * stride_dy_n + d[None, :] * stride_dy_d,
                     mask=mask, other=0.0).to(COMPUTE)
        if MODULATION_GRADS:
            d_shift += tl.sum(dy, axis=0)
            d_scale += tl.sum(dy * x_hat, axis=0)
        g = dy * (1.0 + scale[None, :])  # d loss / d x_hat
        mean_g = tl.sum(g, axis=1) / D
        mean_g_x_hat = tl.sum(g * x_hat, axis=1) / D
        dx = (g - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
        out = (b * N + n[:, None]) * D + d[None, :]
        if RESIDUAL:
            if HAS_G_X_NEW:
                dx += tl.load(g_x_new_ptr + b * stride_g_x_new_b + n[:, None] * stride_g_x_new_n
                              + d[None, :] * stride_g_x_new_d, mask=mask, other=0.0).to(COMPUTE)
            if GATE_GRAD:
                h = tl.load(h_ptr + b * stride_h_b + n[:, None] * stride_h_n + d[None, :] * stride_h_d, mask=mask,
                            other=0.0).to(COMPUTE)
                d_gate += tl.sum(dx * h, axis=0)
            if HAS_BIAS and (GATE_GRAD or BIAS_GRAD):
                sum_dx += tl.sum(tl.where(mask, dx, 0.0), axis=0)
            if WRITE_DH:
                tl.store(dh_ptr + out, (gate[None, :] * dx).to(dh_ptr.dtype.element_ty), mask=mask)
        if WRITE_DX:
            tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    # partial: (B, tiles, PARTIAL_ROWS, D) = d_shift, d_scale, d_gate [, d_bias] of this tile's rows
    partial = partial_ptr + ((b * tl.num_programs(1) + tile) * PARTIAL_ROWS) * D + d
    if MODULATION_GRADS:
        tl.store(partial, d_shift, mask=col_mask)
        tl.store(partial + D, d_scale, mask=col_mask)
    if GATE_GRAD:
        if HAS_BIAS:
            d_gate += tl.load(bias_ptr + d * stride_bias_d, mask=col_mask, other=0.0).to(COMPUTE) * sum_dx
        tl.store(partial + 2 * D, d_gate, mask=col_mask)
    if BIAS_GRAD:
        tl.store(partial + 3 * D, gate * sum_dx, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------

def _tile(N: int, D: int):
    """(BLOCK_R, BLOCK_D, num_warps): whole rows (BLOCK_D >= D) and about 2048 elements per tile, i.e.
    8 elements per thread per tensor with 8 warps, to keep registers (and so occupancy) moderate for
    a memory-bound kernel; SiT widths 768/1152 get 2/1 rows per tile. Never more rows than a sample
    has. Chosen from register counts of the AOT check (python -m kernels.aot --only adaln), not yet
    from a GPU sweep."""
    block_d = next_power_of_2(D)
    block_r = max(1, min(2048 // block_d, next_power_of_2(N)))
    num_warps = min(16, max(4, block_r * block_d // 256))
    return block_r, block_d, num_warps


# Backward programs to aim for: about two resident programs per SM of an H100 (132 SMs).
_BACKWARD_PROGRAMS = 264
# At most 8 warps in the backward: 16 spilled at D = 4096 under Triton 3.6 (kernels/TUNING.md).
_BACKWARD_MAX_WARPS = 8


def _backward_tiles(B: int, N: int, block_r: int):
    """(tiles per sample, row blocks per tile). About _BACKWARD_PROGRAMS programs in all, but at least
    4 row blocks per tile: the fp32 partial sums (write + read: 24 B * tiles * D bytes per sample)
    cost 2 * tiles / N of the bf16 backward's 12 * N * D bytes per sample, 7% at SiT-XL/2 (9 tiles,
    N = 256) and 2% at 512 px. A starting point to sweep on a GPU, not a measured optimum."""
    blocks = cdiv(N, block_r)
    tiles = max(1, min(cdiv(_BACKWARD_PROGRAMS, B), blocks // 4))
    blocks_per_tile = cdiv(blocks, tiles)
    return cdiv(blocks, blocks_per_tile), blocks_per_tile


def _as_rows(v: torch.Tensor, B: int, D: int) -> torch.Tensor:
    return v.reshape(B, D)  # (B, D) or (B, 1, D) -> (B, D), a view


def _op_name(residual: bool) -> str:
    return "adaln_residual_modulate" if residual else "adaln_modulate"


def _forward(x, h, gate, shift, scale, eps, bias=None):
    """Launch the forward; returns (x_new or None, y, mean, rstd)."""
    B, N, D = x.shape
    residual = h is not None
    if _cuda.supports_adaln(_op_name(residual), x, h, gate, shift, scale, bias):  # set_backend("cuda")
        return _cuda.adaln_forward(x, h, gate, shift, scale, eps)
    compute = compute_dtype(x, h, gate, shift, scale, bias)
    block_r, block_d, num_warps = _tile(N, D)
    y = torch.empty((B, N, D), dtype=_modulation_dtype(shift, scale), device=x.device)
    x_new = torch.empty((B, N, D), dtype=x.dtype, device=x.device) if residual else None
    mean = torch.empty((B, N), dtype=compute, device=x.device)
    rstd = torch.empty((B, N), dtype=compute, device=x.device)
    shift2, scale2 = _as_rows(shift, B, D), _as_rows(scale, B, D)
    gate2 = _as_rows(gate, B, D) if residual else scale2
    _adaln_fwd_kernel[(B, cdiv(N, block_r))](
        x, h if residual else x, gate2, shift2, scale2, bias if bias is not None else scale2,
        x_new if residual else y, y, mean, rstd,
        N, D, eps,
        *x.stride(), *(h if residual else x).stride(), *gate2.stride(), *shift2.stride(), *scale2.stride(),
        bias.stride(0) if bias is not None else 0,
        RESIDUAL=residual, HAS_BIAS=bias is not None, COMPUTE=tl_dtype(compute), BLOCK_R=block_r,
        BLOCK_D=block_d, num_warps=num_warps)
    return x_new, y, mean, rstd


def _backward(x, h, gate, scale, mean, rstd, dy, g_x_new, need_dx, need_dh, need_modulation, need_gate,
              x_grad_dtype, bias=None, need_bias=False):
    """Launch the backward; returns (dx, dh, d_shift, d_scale, d_gate, d_bias), (B, D) for d_shift,
    d_scale and d_gate, (D,) for d_bias (None unless `need_bias`). `x` is the normalised input (x_new
    for the residual op); dx has `x_grad_dtype`."""
    B, N, D = x.shape
    residual = h is not None
    if (mean.dtype == torch.float32 and x_grad_dtype == x.dtype and dy.dtype == scale.dtype
            and (not residual or gate.dtype == scale.dtype)
            and _cuda.supports_adaln(_op_name(residual), x, h, gate, scale, scale, bias)):
        return (*_cuda.adaln_backward(x, h, gate, scale, mean, rstd, dy, g_x_new, need_dx, need_dh,
                                      need_modulation, need_gate, x_grad_dtype), None)
    compute = mean.dtype
    block_r, block_d, num_warps = _tile(N, D)
    num_warps = min(num_warps, _BACKWARD_MAX_WARPS)
    tiles, blocks_per_tile = _backward_tiles(B, N, block_r)
    dx = torch.empty((B, N, D), dtype=x_grad_dtype, device=x.device) if need_dx else None
    dh = torch.empty((B, N, D), dtype=h.dtype, device=x.device) if need_dh else None
    partial_rows = 4 if need_bias else 3  # d_shift, d_scale, d_gate [, d_bias]
    partial = (torch.empty((B, tiles, partial_rows, D), dtype=compute, device=x.device)
               if need_modulation or need_gate or need_bias else None)
    scratch = mean
    scale2 = _as_rows(scale, B, D)
    gate2 = _as_rows(gate, B, D) if residual else scale2
    g_strides = g_x_new.stride() if g_x_new is not None else (0, 0, 0)
    _adaln_bwd_kernel[(B, tiles)](
        x, h if residual else x, gate2, scale2, bias if bias is not None else scale2, mean, rstd, dy,
        g_x_new if g_x_new is not None else dy,
        dx if dx is not None else scratch, dh if dh is not None else scratch,
        partial if partial is not None else scratch,
        N, D, blocks_per_tile,
        *x.stride(), *(h if residual else x).stride(), *gate2.stride(), *scale2.stride(),
        bias.stride(0) if bias is not None else 0, *dy.stride(), *g_strides,
        RESIDUAL=residual, HAS_G_X_NEW=g_x_new is not None, WRITE_DX=need_dx, WRITE_DH=need_dh,
        MODULATION_GRADS=need_modulation, GATE_GRAD=need_gate, HAS_BIAS=bias is not None, BIAS_GRAD=need_bias,
        PARTIAL_ROWS=partial_rows, COMPUTE=tl_dtype(compute), BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=num_warps)
    if partial is None:
        return dx, dh, None, None, None, None
    sums = partial.sum(1)  # (B, partial_rows, D), a fixed-order reduction over the tiles
    d_shift = sums[:, 0] if need_modulation else None
    d_scale = sums[:, 1] if need_modulation else None
    d_gate = sums[:, 2] if need_gate else None
    d_bias = sums[:, 3].sum(0) if need_bias else None  # and over the samples
    return dx, dh, d_shift, d_scale, d_gate, d_bias


# One registration per op (kernels._autograd): the eager autograd.Function and the torch.compile
# custom op both run these.

def _modulate_forward(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _, y, mean, rstd = _forward(x, None, None, shift, scale, eps)
    return y, mean, rstd


def _modulate_backward(saved, grads, needs, eps):
    x, scale, mean, rstd = saved
    need_x, need_shift, need_scale = needs
    dx, _, d_shift, d_scale, _, _ = _backward(
        x, None, None, scale, mean, rstd, grads[0], None, need_dx=need_x, need_dh=False,
        need_modulation=need_shift or need_scale, need_gate=False, x_grad_dtype=x.dtype)
    return [dx, d_shift if need_shift else None, d_scale if need_scale else None]


def _fake_stats(x, *tensors):
    compute = compute_dtype(x, *tensors)
    return x.new_empty(x.shape[:2], dtype=compute), x.new_empty(x.shape[:2], dtype=compute)


def _fake_rows(x, mean, need):
    return x.new_empty((x.shape[0], x.shape[2]), dtype=mean.dtype) if need else None


_adaln_modulate = fused_op(
    "alignflow::adaln_modulate", forward=_modulate_forward, backward=_modulate_backward,
    save=lambda inputs, results: (inputs[0], inputs[2], results[1], results[2]),
    fake_forward=lambda x, shift, scale, eps: (
        x.new_empty(x.shape, dtype=_modulation_dtype(shift, scale)), *_fake_stats(x, shift, scale)),
    fake_backward=lambda saved, grads, needs, eps: [
        saved[0].new_empty(saved[0].shape) if needs[0] else None,
        _fake_rows(saved[0], saved[2], needs[1]), _fake_rows(saved[0], saved[2], needs[2])])


def _residual_forward(x: Tensor, h: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, bias: Optional[Tensor],
                      eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(x, h, gate, shift, scale, eps, bias)


def _residual_backward(saved, grads, needs, eps):
    x_new, h, gate, scale, mean, rstd, bias = saved
    g_x_new, dy = grads
    need_x, need_h, need_gate, need_shift, need_scale, need_bias = needs
    dx, dh, d_shift, d_scale, d_gate, d_bias = _backward(
        x_new, h, gate, scale, mean, rstd, dy, g_x_new, need_dx=need_x, need_dh=need_h,
        need_modulation=need_shift or need_scale, need_gate=need_gate, x_grad_dtype=x_new.dtype,
        bias=bias, need_bias=need_bias and bias is not None)
    return [dx, dh, d_gate, d_shift if need_shift else None, d_scale if need_scale else None, d_bias]


def _residual_fake_backward(saved, grads, needs, eps):
    x_new, h, _, _, mean, _, bias = saved
    need_x, need_h, need_gate, need_shift, need_scale, need_bias = needs
    return [x_new.new_empty(x_new.shape) if need_x else None, h.new_empty(h.shape) if need_h else None,
            *(_fake_rows(x_new, mean, need) for need in (need_gate, need_shift, need_scale)),
            bias.new_empty(bias.shape, dtype=mean.dtype) if need_bias and bias is not None else None]


_adaln_residual_modulate = fused_op(
    "alignflow::adaln_residual_modulate", forward=_residual_forward, backward=_residual_backward,
    save=lambda inputs, results: (results[0], inputs[1], inputs[2], inputs[4], results[2], results[3], inputs[5]),
    fake_forward=lambda x, h, gate, shift, scale, bias, eps: (
        x.new_empty(x.shape), x.new_empty(x.shape, dtype=_modulation_dtype(shift, scale)),
        *_fake_stats(x, h, gate, shift, scale, bias)),
    fake_backward=_residual_fake_backward, num_outputs=2)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check(op, x, modulation: dict, h=None, bias=None):
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D), got shape {tuple(x.shape)}")
    B, _, D = x.shape
    if h is not None and h.shape != x.shape:
        raise ValueError(f"{op}: h shape {tuple(h.shape)} must equal x shape {tuple(x.shape)}")
    for name, v in modulation.items():
        if tuple(v.shape) not in ((B, D), (B, 1, D)):
            raise ValueError(f"{op}: {name} must be (B, D) = ({B}, {D}) or (B, 1, D), got {tuple(v.shape)}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"{op}: bias must be (D,) = ({D},), got {tuple(bias.shape)}")
    tensors = [x, h, bias, *modulation.values()]
    if any(t is not None and not t.is_floating_point() for t in tensors):
        raise TypeError(f"{op}: inputs must be floating point, got "
                        f"{[str(t.dtype) for t in tensors if t is not None]}")


def _backend(op, x, tensors):
    if x.numel() == 0:
        return fallback(op, "empty input")
    if x.shape[-1] > MAX_D:
        return fallback(op, f"D = {x.shape[-1]} exceeds the kernel's row width {MAX_D}")
    if cdiv(x.shape[1], _tile(x.shape[1], x.shape[-1])[0]) > 65535:
        return fallback(op, f"N = {x.shape[1]} needs more than 65535 row blocks per sample (grid limit)")
    return resolve(op, tensors, dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16))


def adaln_modulate(x, shift, scale, eps=1e-6):
    """y = LayerNorm(x) * (1 + scale) + shift for x (B, N, D) and per-sample shift, scale."""
    _check("adaln_modulate", x, {"shift": shift, "scale": scale})
    if _backend("adaln_modulate", x, (x, shift, scale)) == "torch":
        return reference_adaln_modulate(x, shift, scale, eps)
    return _adaln_modulate(x, shift, scale, float(eps))


def adaln_residual_modulate(x, h, gate, shift, scale, eps=1e-6, bias=None):
    """(x_new, y): x_new = x + gate * (h + bias), y = LayerNorm(x_new) * (1 + scale) + shift. `bias` (D,):
    the bias of the Linear whose bias-free output is h; its gradient comes out of this op's backward."""
    _check("adaln_residual_modulate", x, {"gate": gate, "shift": shift, "scale": scale}, h, bias)
    if _backend("adaln_residual_modulate", x, (x, h, gate, shift, scale, bias)) == "torch":
        return reference_adaln_residual_modulate(x, h, gate, shift, scale, eps, bias)
    return _adaln_residual_modulate(x, h, gate, shift, scale, bias, float(eps))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)
# ----------------------------------------------------------------------------------------------

def aot_specs():
    """The launches of a SiT training step (batch 32, 256 tokens), recorded from the launchers: plain,
    residual and residual with the Linear's bias (model.fused_bias_grad; the bias in x's dtype, as SiT
    hands over its parameter), forward and backward (every gradient asked for), at D = 72, 768, 1152
    and MAX_D in bf16, fp32, and fp32 x with bf16 modulation (the residual stream kept in fp32)."""
    module = sys.modules[__name__]
    B, N = 32, 256
    bf16, fp32 = torch.bfloat16, torch.float32
    widths = {(bf16, bf16): (72, 768, 1152, MAX_D), (fp32, fp32): (72, 1152, MAX_D), (fp32, bf16): (1152, MAX_D)}
    specs = []
    for (x_dtype, other), Ds in widths.items():
        for D in Ds:
            x, h = torch.empty(B, N, D, dtype=x_dtype, device="meta"), torch.empty(B, N, D, dtype=other, device="meta")
            gate, shift, scale = (torch.empty(B, D, dtype=other, device="meta") for _ in range(3))
            bias = torch.empty(D, dtype=x_dtype, device="meta")
            for op in ("adaln_modulate", "adaln_residual_modulate", "adaln_residual_modulate_bias"):
                residual, with_bias = op != "adaln_modulate", op.endswith("_bias")
                with recorded_launches(module) as launches:
                    x_new, y, mean, rstd = _forward(x, h if residual else None, gate if residual else None, shift,
                                                    scale, 1e-6, bias if with_bias else None)
                    _backward(x_new if residual else x, h if residual else None, gate if residual else None, scale,
                              mean, rstd, torch.empty_like(y), torch.empty_like(x_new) if residual else None,
                              need_dx=True, need_dh=residual, need_modulation=True, need_gate=residual,
                              x_grad_dtype=x_dtype, bias=bias if with_bias else None, need_bias=with_bias)
                params = f"[x {TRITON_TYPES[x_dtype]}, {TRITON_TYPES[other]}, D={D}]"
                # 16-byte loads need D (and so the row strides) a multiple of 16, which the JIT sees;
                # at D = 72 (9 vectors of 8 bf16, a test width, not a SiT one) it loads element-wise
                vectors = 128 if D % 16 == 0 else 0
                specs += [launch_spec(f"{op}_fwd{params}", launches[0], min_load_bits=vectors),
                          launch_spec(f"{op}_bwd{params}", launches[1], min_load_bits=vectors)]
    return specs
