"""GELU (tanh approximation) after a Linear, with that Linear's bias gradient in the same backward pass.

    gelu_tanh(a, bias)      g = GELU_tanh(a),  a = x @ W^T + bias (the Linear's output, bias included)

SiT's MLP is fc2(GELU_tanh(fc1(x))). Its backward reads the GELU input `a` and dL/dg, writes dL/da,
and then torch's Linear backward reads dL/da once more to sum the bias gradient over the rows. Here the
GELU backward kernel sums dL/da over its rows as it writes them, so the bias gradient costs no pass of
its own: the caller computes `a = F.linear(x, W, bias.detach())` and hands `bias` to this op, which
returns its gradient, sum over rows of dL/da (as stored, i.e. rounded to a's dtype, as the reference
sums it). The forward is torch's `F.gelu(a, approximate="tanh")`, so its numerics are torch's.

Why not the GELU in the matmul's epilogue: torch reaches cuBLASLt's GELU epilogue only through
`torch._addmm_activation(..., use_gelu=True)`, which has no autograd formula, runs the exact (erf) GELU
on the CPU but the tanh one on CUDA, and writes no auxiliary pre-activation, so a backward would have to
recompute `a` with a second matmul (2 M K N FLOPs, about 2x the bytes the GELU pass moves at SiT-XL/2's
shapes). cuBLASLt's GELU_AUX / DGELU_BGRAD epilogues that would avoid that are not reachable from torch.

Kernel: `a` and dL/dg are viewed as (M, N) rows; grid (column blocks, row tiles), each program walks
`rows_per_tile` rows of BLOCK_N columns and keeps the bias gradient's partial sum in registers, written
once per (tile, column) to a buffer that torch sums over the tiles: no atomics, bitwise deterministic.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._autograd import fused_op
from ._backend import fallback, resolve
from ._util import TRITON_TYPES, cdiv, compute_dtype, launch_spec, next_power_of_2, recorded_launches, tl_dtype

_BETA = math.sqrt(2.0 / math.pi)  # torch's kBeta = M_SQRT2 * M_2_SQRTPI * 0.5
_KAPPA = 0.044715


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------

class _BiasGradient(torch.autograd.Function):
    """Identity on `a`; the backward gives `bias` the sum of dL/da over all but the last dimension,
    as nn.Linear's backward sums it."""

    @staticmethod
    def forward(ctx, a, bias):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        d_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad, d_bias


def reference_gelu_tanh(a, bias=None):
    """GELU_tanh(a) (torch's op); with `bias` (the Linear's bias that `a` already holds, given because
    `a` was computed with bias.detach()), bias gets dL/da summed over the rows in the backward."""
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        a = _BiasGradient.apply(a, bias)
    return F.gelu(a, approximate="tanh")


def reference_gelu_tanh_backward(a, dg):
    """dL/da of g = GELU_tanh(a) in fp32 (fp64 for fp64 inputs), torch's formula."""
    dtype = compute_dtype(a, dg)
    x, dy = a.to(dtype), dg.to(dtype)
    inner = _BETA * (x + _KAPPA * x * x * x)
    t = torch.tanh(inner)
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _BETA * (1 + 3 * _KAPPA * x * x))


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def gelu_tanh_inner(x):
    """tanh(sqrt(2/pi) (x + 0.044715 x^3)), torch's GELU(tanh) inner tanh, stable for large |x|.
    GELU_tanh(x) = 0.5 x (1 + gelu_tanh_inner(x)). Shared with kernels.linear_gelu's epilogues."""
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    e = tl.exp(-2.0 * tl.abs(inner))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(inner < 0, -t, t)


@triton.jit
def gelu_tanh_derivative(x, t):
    """d GELU_tanh / dx at x, given t = gelu_tanh_inner(x) (torch's formula)."""
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)


@triton.jit
def _gelu_bwd_kernel(
    a_ptr, dg_ptr, da_ptr, partial_ptr,
    M, N, rows_per_tile, stride_a_row, stride_dg_row,
    BIAS_GRAD: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.program_id(1)
    col_mask = cols < N
    d_bias = tl.zeros([BLOCK_N], dtype=COMPUTE)
    for i in range(0, rows_per_tile, BLOCK_M):
        rows = (tile * rows_per_tile + i + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < M)[:, None] & col_mask[None, :]
        x = tl.load(a_ptr + rows[:, None] * stride_a_row + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(dg_ptr + rows[:, None] * stride_dg_row + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        dx = dy * gelu_tanh_derivative(x, gelu_tanh_inner(x))
        stored = dx.to(da_ptr.dtype.element_ty)
        tl.store(da_ptr + rows[:, None] * N + cols[None, :], stored, mask=mask)
        if BIAS_GRAD:  # sums dL/da as stored, as the reference sums it
            d_bias += tl.sum(tl.where(mask, stored.to(COMPUTE), 0.0), axis=0)
    if BIAS_GRAD:
        tl.store(partial_ptr + tile * N + cols, d_bias, mask=col_mask)


# Programs to aim for: about four resident per SM of an H100 (132 SMs). Not yet from a GPU sweep.
_PROGRAMS = 528
_BLOCK_M = 16


def _tiles(M: int, N: int):
    """(BLOCK_N, col blocks, row tiles, rows per tile): 16 x 128 elements an iteration (16 per thread per
    tensor with 4 warps), at least 4 iterations per tile, so the fp32 partial sums (4 B per tile and
    column, written and read) stay under 1/(4 x 16 x bf16 bytes) of the 6 B per element the pass moves."""
    block_n = min(128, next_power_of_2(N))
    col_blocks = cdiv(N, block_n)
    tiles = max(1, min(cdiv(_PROGRAMS, col_blocks), cdiv(M, 4 * _BLOCK_M), 65535))
    rows_per_tile = cdiv(cdiv(M, tiles), _BLOCK_M) * _BLOCK_M
    return block_n, col_blocks, cdiv(M, rows_per_tile), rows_per_tile


def _rows(t: Tensor) -> Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _backward_launch(a: Tensor, dg: Tensor, need_bias: bool):
    """(dL/da in a's shape and dtype, dL/dbias (N,) in the compute dtype or None)."""
    a2, dg2 = _rows(a), _rows(dg)
    M, N = a2.shape
    compute = compute_dtype(a, dg)
    block_n, col_blocks, tiles, rows_per_tile = _tiles(M, N)
    da = torch.empty((M, N), dtype=a.dtype, device=a.device)
    partial = torch.empty((tiles, N), dtype=compute, device=a.device) if need_bias else da
    _gelu_bwd_kernel[(col_blocks, tiles)](
        a2, dg2, da, partial, M, N, rows_per_tile, a2.stride(0), dg2.stride(0),
        BIAS_GRAD=need_bias, COMPUTE=tl_dtype(compute), BLOCK_M=_BLOCK_M, BLOCK_N=block_n, num_warps=4)
    return da.view(a.shape), (partial.sum(0) if need_bias else None)  # a fixed-order reduction


def _gelu_forward(a: Tensor, bias: Tensor) -> Tensor:
    return F.gelu(a, approximate="tanh")


def _gelu_backward(saved, grads, needs):
    (a,) = saved
    need_a, need_bias = needs
    if not (need_a or need_bias):
        return [None, None]
    da, d_bias = _backward_launch(a, grads[0], need_bias)
    return [da if need_a else None, d_bias]


_gelu_tanh = fused_op(
    "alignflow::gelu_tanh", forward=_gelu_forward, backward=_gelu_backward,
    save=lambda inputs, results: (inputs[0],),
    fake_forward=lambda a, bias: a.new_empty(a.shape),
    fake_backward=lambda saved, grads, needs: [
        saved[0].new_empty(saved[0].shape) if needs[0] else None,
        saved[0].new_empty((saved[0].shape[-1],), dtype=compute_dtype(saved[0])) if needs[1] else None])


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def gelu_tanh(a, bias=None):
    """GELU_tanh(a) for `a` the output of a Linear; pass that Linear's `bias` when `a` was computed
    with `bias.detach()`: its gradient then comes out of the GELU backward's pass (no separate sum)."""
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != a.shape[-1]):
        raise ValueError(f"gelu_tanh: bias must be ({a.shape[-1]},) (a's last dimension), got {tuple(bias.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"gelu_tanh: a must be floating point, got {a.dtype}")
    if a.numel() == 0:
        backend = fallback("gelu_tanh", "empty input")
    else:
        backend = resolve("gelu_tanh", (a, bias), dtypes=(torch.float64, torch.float32, torch.float16,
                                                          torch.bfloat16))
    if backend == "torch":
        return reference_gelu_tanh(a, bias)
    if bias is None:  # only the gradient sink's slot: a dL/dbias nobody asked for is not computed
        bias = a.new_empty((a.shape[-1],))
    return _gelu_tanh(a, bias)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)
# ----------------------------------------------------------------------------------------------

# fc1's output width N = 4 x hidden (mlp_ratio 4) of the SiT models whose GELU backward is built
_AOT_WIDTHS = {"SiT-B/2": 3072, "SiT-XL/2": 4608}


def aot_specs():
    """The GELU backward launches of a SiT training step (batch 32 x 256 tokens), recorded from the
    launcher on meta tensors: fc1's output at SiT-B/2's and SiT-XL/2's widths, bf16 and fp32, with the
    bias gradient (SiT's fc1) and without (a bias that needs none). Both widths give one build (M, N,
    the rows per tile and the row strides all multiples of 16; BLOCK_N 128), listed once. A pass that
    streams two tensors in and one out asks for 16-byte loads."""
    module = sys.modules[__name__]
    specs, builds = [], set()
    for dtype in (torch.bfloat16, torch.float32):
        for bias_grad in (True, False):
            for N in _AOT_WIDTHS.values():
                a = torch.empty(32, 256, N, dtype=dtype, device="meta")
                with recorded_launches(module) as launches:
                    _backward_launch(a, torch.empty_like(a), bias_grad)
                (launch,) = launches
                spec = launch_spec(f"gelu_tanh_bwd[{TRITON_TYPES[dtype]}, bias_grad={bias_grad}]", launch,
                                   min_load_bits=128)
                build = repr(dataclasses.replace(spec, name=""))
                if build not in builds:
                    builds.add(build)
                    specs.append(spec)
    return specs
