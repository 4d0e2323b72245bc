"""Non-causal multi-head attention for SiT shapes.

    attention(q, k, v, scale=None) -> o                 q, k, v, o: (B, H, N, d)
    attention_qkv(qkv, num_heads, scale=None) -> o      qkv: (B, N, 3 * H * d) -> o: (B, N, H * d)
    o = softmax(q k^T * scale) v,  scale = d ** -0.5 by default

Both entry points run the same Triton kernels, which take every tensor as a (B, H, N, d) view given
by strides with unit stride along d. `attention_qkv` hands them strided views into the packed QKV
projection output (the layout of `nn.Linear(D, 3 * D)`), writes o straight into the (B, N, H * d)
layout the output projection reads, and its backward writes d_qkv in the packed layout: the
permute/copy that SDPA's callers do before and after attention never happens.

Kernels (FlashAttention-2 style, fp32 accumulation, bf16/fp16 tensor-core matmuls on the GPU):
- forward: one program per (query block, batch*head), online softmax over key blocks; saves the
  log-sum-exp per row in base 2 (lse2 = log2 sum_j exp2(s_ij * scale * log2 e)), fp32.
- backward: delta = rowsum(dO * O); one kernel per key block accumulates dk, dv over query blocks;
  another per query block accumulates dq over key blocks. No atomics, so gradients are bitwise
  deterministic.
- head dim: split into a power-of-two main tile D0 and a masked power-of-two tail tile D1 (>= 16,
  the smallest tl.dot K), each with its own tl.dot. d = 72 computes 64 + 16 = 80 columns instead of
  the 128 of a kernel that pads d to a power of two; 96 = 64 + 32 and 64, 128 need no tail.

qk-norm (REPA's --qk-norm: an affine LayerNorm over the head dim of q and k, as timm's
`Attention(qk_norm=True)` with nn.LayerNorm, eps 1e-5) is fused into the kernels' q/k loads: each
q or k tile is normalised in fp32 after loading (k tiles once per query block that reads them). The
backward recomputes the normalised tiles, runs the LayerNorm backward on dq and dk in the dq and
dk/dv kernels, and writes per-block partial sums of the norm parameters' gradients, summed on the
host (no atomics). The fused path needs all four parameters (q/k weight and bias); any other
combination runs the reference (logged once).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._autograd import fused_op
from ._backend import fallback, get_backend, interpreting, resolve
from ._util import TRITON_TYPES, cdiv, compute_dtype, launch_spec, next_power_of_2, recorded_launches, tl_dtype

LOG2E = math.log2(math.e)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------

def _layer_norm(x, weight, bias, eps):
    if weight is None and bias is None:
        return x
    return F.layer_norm(x, (x.shape[-1],), None if weight is None else weight.to(x.dtype),
                        None if bias is None else bias.to(x.dtype), eps)


def reference_attention(q, k, v, scale=None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                        k_norm_bias=None, qk_norm_eps=1e-5):
    """softmax(q k^T * scale) v, computed in fp32 (fp64 for fp64 inputs), output in q's dtype.

    With qk-norm weights or biases, q (and/or k) first gets a LayerNorm over the head dim (in the
    compute dtype), as timm's `Attention(qk_norm=True)` does."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = _layer_norm(q.to(dtype), q_norm_weight, q_norm_bias, qk_norm_eps)
    k = _layer_norm(k.to(dtype), k_norm_weight, k_norm_bias, qk_norm_eps)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, N)
    return (scores.softmax(-1) @ v.to(dtype)).to(v.dtype)


def split_qkv(qkv, num_heads):
    """(B, N, 3 * H * d) -> q, k, v each (B, H, N, d), as the public SiT code permutes them.
    For a qkv with unit stride along its last dim these are views (no copy)."""
    B, N, width = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def reference_attention_qkv(qkv, num_heads, scale=None, q_norm_weight=None, q_norm_bias=None,
                            k_norm_weight=None, k_norm_bias=None, qk_norm_eps=1e-5):
    """The public SiT/REPA path: split and permute the packed projection, attend, merge the heads."""
    q, k, v = split_qkv(qkv, num_heads)
    o = reference_attention(q, k, v, scale, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                            qk_norm_eps)
    return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)  # (B, N, H * d)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _head_base(ptr, bh, H, stride_b, stride_h, ALIGN: tl.constexpr):
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    base = ptr + tl.multiple_of(b * stride_b + h * stride_h, ALIGN)
    if ALIGN > 1:  # the launcher checked: 16-byte aligned tensors, strides multiples of 8 elements
        base = tl.multiple_of(base, 16)
    return base


@triton.jit
def _load_tile(base, rows, row_mask, stride_n, D_START: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, DTYPE: tl.constexpr):
    """(rows, columns D_START .. D_START + BLOCK_D) of one head's (N, HEAD_DIM) slice, zero outside."""
    d = D_START + tl.arange(0, BLOCK_D)
    offsets = tl.multiple_of(rows * stride_n, ALIGN)[:, None] + d[None, :]
    mask = row_mask[:, None]
    if D_START + BLOCK_D > HEAD_DIM:
        mask = mask & (d < HEAD_DIM)[None, :]
    return tl.load(base + offsets, mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _load_tile_t(base, rows, row_mask, stride_n, D_START: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, DTYPE: tl.constexpr):
    """The transpose of `_load_tile`: (columns, rows)."""
    d = D_START + tl.arange(0, BLOCK_D)
    offsets = tl.multiple_of(rows * stride_n, ALIGN)[None, :] + d[:, None]
    mask = row_mask[None, :]
    if D_START + BLOCK_D > HEAD_DIM:
        mask = mask & (d < HEAD_DIM)[:, None]
    return tl.load(base + offsets, mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _store_tile(base, rows, row_mask, stride_n, value, D_START: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr):
    d = D_START + tl.arange(0, BLOCK_D)
    offsets = tl.multiple_of(rows * stride_n, ALIGN)[:, None] + d[None, :]
    mask = row_mask[:, None]
    if D_START + BLOCK_D > HEAD_DIM:
        mask = mask & (d < HEAD_DIM)[None, :]
    tl.store(base + offsets, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _load_pair(base, rows, row_mask, stride_n, D_AXIS: tl.constexpr, HEAD_DIM: tl.constexpr,
               D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr, DTYPE: tl.constexpr):
    """The main and tail head-dim tiles (x0, x1) of some rows, with the head dim along axis D_AXIS
    (1: (rows, d) tiles, 0: transposed). Without a tail (D1 == 0), x1 is x0 and must not be used."""
    if D_AXIS == 1:
        x0 = _load_tile(base, rows, row_mask, stride_n, 0, D0, HEAD_DIM, ALIGN, DTYPE)
        x1 = x0
        if D1 > 0:
            x1 = _load_tile(base, rows, row_mask, stride_n, D0, D1, HEAD_DIM, ALIGN, DTYPE)
    else:
        x0 = _load_tile_t(base, rows, row_mask, stride_n, 0, D0, HEAD_DIM, ALIGN, DTYPE)
        x1 = x0
        if D1 > 0:
            x1 = _load_tile_t(base, rows, row_mask, stride_n, D0, D1, HEAD_DIM, ALIGN, DTYPE)
    return x0, x1


@triton.jit
def _normalize(x0, x1, eps, D_AXIS: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """x_hat = (x - mean) / sqrt(var + eps) over the head dim of a tile pair (the tail's padding
    columns stay zero); returns x_hat0, x_hat1, rstd."""
    mean = tl.sum(x0, D_AXIS)
    if D1 > 0:
        mean += tl.sum(x1, D_AXIS)
    mean = tl.expand_dims(mean / HEAD_DIM, D_AXIS)
    c0 = x0 - mean
    var = tl.sum(c0 * c0, D_AXIS)
    c1 = c0
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        c1 = tl.where(tl.expand_dims(d1 < HEAD_DIM, 1 - D_AXIS), x1 - mean, 0.0)
        var += tl.sum(c1 * c1, D_AXIS)
    rstd = 1.0 / tl.sqrt(var / HEAD_DIM + eps)
    r = tl.expand_dims(rstd, D_AXIS)
    return c0 * r, c1 * r, rstd


@triton.jit
def _load_qk(base, rows, row_mask, stride_n, w_ptr, b_ptr, eps, D_AXIS: tl.constexpr,
             HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
             QK_NORM: tl.constexpr, COMPUTE: tl.constexpr, DOT: tl.constexpr):
    """q or k tiles for the matmuls; with QK_NORM, LayerNorm-ed over the head dim (weight w, bias b)
    in COMPUTE precision. Rows past N are zero either way."""
    if QK_NORM:
        x0, x1 = _load_pair(base, rows, row_mask, stride_n, D_AXIS, HEAD_DIM, D0, D1, ALIGN, COMPUTE)
        xhat0, xhat1, rstd = _normalize(x0, x1, eps, D_AXIS, HEAD_DIM, D0, D1)
        keep = tl.expand_dims(row_mask, D_AXIS)
        d0 = tl.arange(0, D0)
        w0 = tl.expand_dims(tl.load(w_ptr + d0).to(COMPUTE), 1 - D_AXIS)
        b0 = tl.expand_dims(tl.load(b_ptr + d0).to(COMPUTE), 1 - D_AXIS)
        x0 = tl.where(keep, xhat0 * w0 + b0, 0.0)
        if D1 > 0:
            d1 = D0 + tl.arange(0, D1)
            w1 = tl.expand_dims(tl.load(w_ptr + d1, mask=d1 < HEAD_DIM, other=0.0).to(COMPUTE), 1 - D_AXIS)
            b1 = tl.expand_dims(tl.load(b_ptr + d1, mask=d1 < HEAD_DIM, other=0.0).to(COMPUTE), 1 - D_AXIS)
            x1 = tl.where(keep, xhat1 * w1 + b1, 0.0)
        else:
            x1 = x0
    else:
        x0, x1 = _load_pair(base, rows, row_mask, stride_n, D_AXIS, HEAD_DIM, D0, D1, ALIGN, DOT)
    return x0.to(DOT), x1.to(DOT)


@triton.jit
def _layer_norm_backward(base, rows, row_mask, stride_n, dy0, dy1, w_ptr, eps, dw_ptr, db_ptr, partial,
                         HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
                         COMPUTE: tl.constexpr):
    """Gradient (dx0, dx1) of LayerNorm-ed rows x (reloaded from base) given dy, the gradient of the
    normalised rows; stores this block's partial sums of dy * x_hat and dy over its rows at row
    `partial` of the (blocks, HEAD_DIM) weight and bias gradient buffers."""
    x0, x1 = _load_pair(base, rows, row_mask, stride_n, 1, HEAD_DIM, D0, D1, ALIGN, COMPUTE)
    xhat0, xhat1, rstd = _normalize(x0, x1, eps, 1, HEAD_DIM, D0, D1)
    keep = row_mask[:, None]
    d0 = tl.arange(0, D0)
    dy0 = tl.where(keep, dy0, 0.0)
    g0 = dy0 * tl.load(w_ptr + d0).to(COMPUTE)[None, :]
    mean_g = tl.sum(g0, 1)
    mean_gx = tl.sum(g0 * xhat0, 1)
    tl.store(dw_ptr + partial * HEAD_DIM + d0, tl.sum(dy0 * xhat0, 0))
    tl.store(db_ptr + partial * HEAD_DIM + d0, tl.sum(dy0, 0))
    g1 = g0
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        dy1 = tl.where(keep, dy1, 0.0)
        g1 = dy1 * tl.load(w_ptr + d1, mask=d1 < HEAD_DIM, other=0.0).to(COMPUTE)[None, :]
        mean_g += tl.sum(g1, 1)
        mean_gx += tl.sum(g1 * xhat1, 1)
        tl.store(dw_ptr + partial * HEAD_DIM + d1, tl.sum(dy1 * xhat1, 0), mask=d1 < HEAD_DIM)
        tl.store(db_ptr + partial * HEAD_DIM + d1, tl.sum(dy1, 0), mask=d1 < HEAD_DIM)
    mean_g = (mean_g / HEAD_DIM)[:, None]
    mean_gx = (mean_gx / HEAD_DIM)[:, None]
    dx0 = (g0 - mean_g - xhat0 * mean_gx) * rstd[:, None]
    dx1 = dx0
    if D1 > 0:
        dx1 = (g1 - mean_g - xhat1 * mean_gx) * rstd[:, None]
    return dx0, dx1


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr, N, H, qk_scale, eps,
    stride_q_b, stride_q_h, stride_q_n, stride_k_b, stride_k_h, stride_k_n, stride_v_b, stride_v_h, stride_v_n,
    stride_o_b, stride_o_h, stride_o_n,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, QK_NORM: tl.constexpr,
    DOT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    q_base = _head_base(q_ptr, bh, H, stride_q_b, stride_q_h, ALIGN)
    k_base = _head_base(k_ptr, bh, H, stride_k_b, stride_k_h, ALIGN)
    v_base = _head_base(v_ptr, bh, H, stride_v_b, stride_v_h, ALIGN)
    o_base = _head_base(o_ptr, bh, H, stride_o_b, stride_o_h, ALIGN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    q0, q1 = _load_qk(q_base, rows, row_mask, stride_q_n, qw_ptr, qb_ptr, eps, 1, HEAD_DIM, D0, D1, ALIGN, QK_NORM,
                      COMPUTE, DOT)  # (BLOCK_M, D0), (BLOCK_M, D1)
    m_i = tl.full([BLOCK_M], float("-inf"), COMPUTE)  # running max of s * scale * log2 e
    l_i = tl.zeros([BLOCK_M], COMPUTE)  # running sum of exp2(. - m_i)
    acc0 = tl.zeros([BLOCK_M, D0], COMPUTE)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_M, D1], COMPUTE)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        kT0, kT1 = _load_qk(k_base, cols, col_mask, stride_k_n, kw_ptr, kb_ptr, eps, 0, HEAD_DIM, D0, D1, ALIGN,
                            QK_NORM, COMPUTE, DOT)  # (D0, BLOCK_N), (D1, BLOCK_N)
        s = tl.dot(q0, kT0, input_precision=PRECISION, out_dtype=COMPUTE)  # (BLOCK_M, BLOCK_N)
        if D1 > 0:
            s = tl.dot(q1, kT1, acc=s, input_precision=PRECISION, out_dtype=COMPUTE)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_dot = p.to(DOT)
        v0, v1 = _load_pair(v_base, cols, col_mask, stride_v_n, 1, HEAD_DIM, D0, D1, ALIGN, DOT)
        acc0 = tl.dot(p_dot, v0, acc=acc0 * alpha[:, None], input_precision=PRECISION, out_dtype=COMPUTE)
        if D1 > 0:
            acc1 = tl.dot(p_dot, v1, acc=acc1 * alpha[:, None], input_precision=PRECISION, out_dtype=COMPUTE)
        m_i = m_new
    inv_l = 1.0 / l_i
    _store_tile(o_base, rows, row_mask, stride_o_n, acc0 * inv_l[:, None], 0, D0, HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(o_base, rows, row_mask, stride_o_n, acc1 * inv_l[:, None], D0, D1, HEAD_DIM, ALIGN)
    tl.store(lse_ptr + bh.to(tl.int64) * N + rows, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, N, H, stride_o_b, stride_o_h, stride_o_n, stride_do_b, stride_do_h, stride_do_n,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax backward's per-row correction."""
    bh = tl.program_id(1)
    o_base = _head_base(o_ptr, bh, H, stride_o_b, stride_o_h, ALIGN)
    do_base = _head_base(do_ptr, bh, H, stride_do_b, stride_do_h, ALIGN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    o0, o1 = _load_pair(o_base, rows, row_mask, stride_o_n, 1, HEAD_DIM, D0, D1, ALIGN, COMPUTE)
    do0, do1 = _load_pair(do_base, rows, row_mask, stride_do_n, 1, HEAD_DIM, D0, D1, ALIGN, COMPUTE)
    delta = tl.sum(o0 * do0, 1)
    if D1 > 0:
        delta += tl.sum(o1 * do1, 1)
    tl.store(delta_ptr + bh.to(tl.int64) * N + rows, delta, mask=row_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    qw_ptr, qb_ptr, kw_ptr, kb_ptr, dkw_ptr, dkb_ptr, N, H, qk_scale, scale, eps,
    stride_q_b, stride_q_h, stride_q_n, stride_k_b, stride_k_h, stride_k_n, stride_v_b, stride_v_h, stride_v_n,
    stride_do_b, stride_do_h, stride_do_n, stride_dk_b, stride_dk_h, stride_dk_n, stride_dv_b, stride_dv_h,
    stride_dv_n,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_NORM: tl.constexpr,
    DOT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key block: dv = sum_i P^T dO, dk = scale * sum_i dS^T Q over all query blocks i (then
    through the k LayerNorm with QK_NORM). Works on transposed scores (BLOCK_N, BLOCK_M) so no
    register tile needs a transpose."""
    bh = tl.program_id(1)
    q_base = _head_base(q_ptr, bh, H, stride_q_b, stride_q_h, ALIGN)
    k_base = _head_base(k_ptr, bh, H, stride_k_b, stride_k_h, ALIGN)
    v_base = _head_base(v_ptr, bh, H, stride_v_b, stride_v_h, ALIGN)
    do_base = _head_base(do_ptr, bh, H, stride_do_b, stride_do_h, ALIGN)
    stats = bh.to(tl.int64) * N
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # Keys past N load as zero; their dk, dv are never stored.
    k0, k1 = _load_qk(k_base, cols, col_mask, stride_k_n, kw_ptr, kb_ptr, eps, 1, HEAD_DIM, D0, D1, ALIGN, QK_NORM,
                      COMPUTE, DOT)  # (BLOCK_N, D0), (BLOCK_N, D1)
    v0, v1 = _load_pair(v_base, cols, col_mask, stride_v_n, 1, HEAD_DIM, D0, D1, ALIGN, DOT)
    dk0 = tl.zeros([BLOCK_N, D0], COMPUTE)
    dv0 = tl.zeros([BLOCK_N, D0], COMPUTE)
    dk1 = dk0
    if D1 > 0:
        dk1 = tl.zeros([BLOCK_N, D1], COMPUTE)
        dv1 = tl.zeros([BLOCK_N, D1], COMPUTE)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        qT0, qT1 = _load_qk(q_base, rows, row_mask, stride_q_n, qw_ptr, qb_ptr, eps, 0, HEAD_DIM, D0, D1, ALIGN,
                            QK_NORM, COMPUTE, DOT)  # (D0, BLOCK_M), (D1, BLOCK_M)
        sT = tl.dot(k0, qT0, input_precision=PRECISION, out_dtype=COMPUTE)  # (BLOCK_N, BLOCK_M)
        if D1 > 0:
            sT = tl.dot(k1, qT1, acc=sT, input_precision=PRECISION, out_dtype=COMPUTE)
        # Queries past N get lse = +inf, so P = 0 and they add nothing.
        lse = tl.load(lse_ptr + stats + rows, mask=row_mask, other=float("inf"))
        # Keys past N score 0; with a very negative lse exp2(0 - lse) overflows, so mask P itself.
        pT = tl.where(col_mask[:, None], tl.exp2(sT * qk_scale - lse[None, :]), 0.0)
        pT_dot = pT.to(DOT)
        do0, do1 = _load_pair(do_base, rows, row_mask, stride_do_n, 1, HEAD_DIM, D0, D1, ALIGN, DOT)  # (BLOCK_M, D*)
        dv0 = tl.dot(pT_dot, do0, acc=dv0, input_precision=PRECISION, out_dtype=COMPUTE)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=PRECISION, out_dtype=COMPUTE)  # (BLOCK_N, BLOCK_M)
        if D1 > 0:
            dv1 = tl.dot(pT_dot, do1, acc=dv1, input_precision=PRECISION, out_dtype=COMPUTE)
            dpT = tl.dot(v1, tl.trans(do1), acc=dpT, input_precision=PRECISION, out_dtype=COMPUTE)
        delta = tl.load(delta_ptr + stats + rows, mask=row_mask, other=0.0)
        dsT = (pT * (dpT - delta[None, :])).to(DOT)
        dk0 = tl.dot(dsT, tl.trans(qT0), acc=dk0, input_precision=PRECISION, out_dtype=COMPUTE)
        if D1 > 0:
            dk1 = tl.dot(dsT, tl.trans(qT1), acc=dk1, input_precision=PRECISION, out_dtype=COMPUTE)
    dk0 = dk0 * scale
    dk1 = dk1 * scale
    if QK_NORM:
        dk0, dk1 = _layer_norm_backward(k_base, cols, col_mask, stride_k_n, dk0, dk1, kw_ptr, eps, dkw_ptr, dkb_ptr,
                                        bh * tl.num_programs(0) + tl.program_id(0), HEAD_DIM, D0, D1, ALIGN,
                                        COMPUTE)
    dk_base = _head_base(dk_ptr, bh, H, stride_dk_b, stride_dk_h, ALIGN)
    dv_base = _head_base(dv_ptr, bh, H, stride_dv_b, stride_dv_h, ALIGN)
    _store_tile(dk_base, cols, col_mask, stride_dk_n, dk0, 0, D0, HEAD_DIM, ALIGN)
    _store_tile(dv_base, cols, col_mask, stride_dv_n, dv0, 0, D0, HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(dk_base, cols, col_mask, stride_dk_n, dk1, D0, D1, HEAD_DIM, ALIGN)
        _store_tile(dv_base, cols, col_mask, stride_dv_n, dv1, D0, D1, HEAD_DIM, ALIGN)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    qw_ptr, qb_ptr, kw_ptr, kb_ptr, dqw_ptr, dqb_ptr, N, H, qk_scale, scale, eps,
    stride_q_b, stride_q_h, stride_q_n, stride_k_b, stride_k_h, stride_k_n, stride_v_b, stride_v_h, stride_v_n,
    stride_do_b, stride_do_h, stride_do_n, stride_dq_b, stride_dq_h, stride_dq_n,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_NORM: tl.constexpr,
    DOT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block: dq = scale * sum_j dS K over all key blocks j (then through the q LayerNorm
    with QK_NORM)."""
    bh = tl.program_id(1)
    q_base = _head_base(q_ptr, bh, H, stride_q_b, stride_q_h, ALIGN)
    k_base = _head_base(k_ptr, bh, H, stride_k_b, stride_k_h, ALIGN)
    v_base = _head_base(v_ptr, bh, H, stride_v_b, stride_v_h, ALIGN)
    do_base = _head_base(do_ptr, bh, H, stride_do_b, stride_do_h, ALIGN)
    stats = bh.to(tl.int64) * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    q0, q1 = _load_qk(q_base, rows, row_mask, stride_q_n, qw_ptr, qb_ptr, eps, 1, HEAD_DIM, D0, D1, ALIGN, QK_NORM,
                      COMPUTE, DOT)  # (BLOCK_M, D0), (BLOCK_M, D1)
    do0, do1 = _load_pair(do_base, rows, row_mask, stride_do_n, 1, HEAD_DIM, D0, D1, ALIGN, DOT)
    dq0 = tl.zeros([BLOCK_M, D0], COMPUTE)
    dq1 = dq0
    if D1 > 0:
        dq1 = tl.zeros([BLOCK_M, D1], COMPUTE)
    lse = tl.load(lse_ptr + stats + rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + stats + rows, mask=row_mask, other=0.0)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        # Keys past N load as zero (also after qk-norm), so whatever dS they get adds 0 to dq.
        kT0, kT1 = _load_qk(k_base, cols, col_mask, stride_k_n, kw_ptr, kb_ptr, eps, 0, HEAD_DIM, D0, D1, ALIGN,
                            QK_NORM, COMPUTE, DOT)  # (D0, BLOCK_N), (D1, BLOCK_N)
        vT0, vT1 = _load_pair(v_base, cols, col_mask, stride_v_n, 0, HEAD_DIM, D0, D1, ALIGN, DOT)
        s = tl.dot(q0, kT0, input_precision=PRECISION, out_dtype=COMPUTE)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do0, vT0, input_precision=PRECISION, out_dtype=COMPUTE)
        if D1 > 0:
            s = tl.dot(q1, kT1, acc=s, input_precision=PRECISION, out_dtype=COMPUTE)
            dp = tl.dot(do1, vT1, acc=dp, input_precision=PRECISION, out_dtype=COMPUTE)
        # Keys past N score 0; with a very negative lse exp2(0 - lse) overflows (inf * 0 = NaN in dq).
        p = tl.where(col_mask[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(DOT)
        dq0 = tl.dot(ds, tl.trans(kT0), acc=dq0, input_precision=PRECISION, out_dtype=COMPUTE)
        if D1 > 0:
            dq1 = tl.dot(ds, tl.trans(kT1), acc=dq1, input_precision=PRECISION, out_dtype=COMPUTE)
    dq0 = dq0 * scale
    dq1 = dq1 * scale
    if QK_NORM:
        dq0, dq1 = _layer_norm_backward(q_base, rows, row_mask, stride_q_n, dq0, dq1, qw_ptr, eps, dqw_ptr, dqb_ptr,
                                        bh * tl.num_programs(0) + tl.program_id(0), HEAD_DIM, D0, D1, ALIGN,
                                        COMPUTE)
    dq_base = _head_base(dq_ptr, bh, H, stride_dq_b, stride_dq_h, ALIGN)
    _store_tile(dq_base, rows, row_mask, stride_dq_n, dq0, 0, D0, HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(dq_base, rows, row_mask, stride_dq_n, dq1, D0, D1, HEAD_DIM, ALIGN)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def head_tiles(head_dim: int) -> tuple[int, int]:
    """(D0, D1): the largest power of two <= head_dim, and a power-of-two tail (>= 16, or 0 if none)
    covering the rest. 64 -> (64, 0), 72 -> (64, 16), 96 -> (64, 32), 128 -> (128, 0)."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    return d0, (max(16, next_power_of_2(rest)) if rest else 0)


# Launch configurations per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages) (for dkdv, BLOCK_M is the
# query block it loops over): the largest tiles whose sm_80/sm_90 builds use no stack under Triton 3.6
# and 3.8; the build reports behind each entry are in kernels/TUNING.md. Not yet tuned by timing.
_GPU_CONFIGS = {
    "half": {"fwd": (128, 64, 8, 2), "dkdv": (32, 64, 8, 2), "dkdv_qk_norm": (16, 64, 4, 2), "dq": (64, 32, 8, 2)},
    "fp32": {"fwd": (32, 32, 8, 1), "dkdv": (32, 32, 8, 2), "dq": (32, 32, 8, 2)},
    "tf32": {"fwd": (128, 32, 8, 2), "dkdv": (16, 64, 4, 1), "dkdv_qk_norm": (16, 64, 8, 2), "dq": (64, 16, 4, 2)},
}
_INTERPRET_BLOCK = 32
_DELTA_BLOCK = 64


def _config_table(half: bool, precision: str) -> str:
    """The _GPU_CONFIGS table of a build: "half" for bf16/fp16 tiles, else "fp32" (exact) or "tf32"."""
    return "half" if half else {"ieee": "fp32", "tf32": "tf32"}[precision]


def _gpu_config(kernel: str, table: str, qk_norm: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel` ("fwd", "dkdv", "dq") from the `table`
    ("half", "fp32", "tf32"); a "<kernel>_qk_norm" entry, where there is one, serves the fused qk-norm
    variant."""
    entries = _GPU_CONFIGS[table]
    return entries.get(f"{kernel}_qk_norm", entries[kernel]) if qk_norm else entries[kernel]


def _launch_config(kernel: str, q, meta: dict, qk_norm: bool = False, target: str | None = None):
    """(BLOCK_M, BLOCK_N, launch options) of `kernel` for inputs like `q` built with `meta`, launched for
    `target` (by default where a launch on q runs now)."""
    if (target or launch_target(q)) == "interpret":
        return _INTERPRET_BLOCK, _INTERPRET_BLOCK, {}
    table = _config_table(q.dtype != torch.float32, meta["PRECISION"])
    block_m, block_n, num_warps, num_stages = _gpu_config(kernel, table, qk_norm)
    return block_m, block_n, dict(num_warps=num_warps, num_stages=num_stages)


def _alignment(*tensors) -> int:
    """8 when every tensor starts on 16 bytes and every batch/head/row stride is a multiple of 8
    elements, so every row starts on 16 bytes and loads vectorise (with d = 72, or q, k, v inside a
    packed qkv, the compiler cannot see that from its own argument checks), else 1."""
    aligned = all(t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:3]) for t in tensors)
    return 8 if aligned else 1


# Where the launches run, which picks their tiles and matmul precision: "interpret" (Triton's CPU
# interpreter), "gpu", or "gpu_tf32" (a GPU with PyTorch's TF32 matmul flag on). The launchers take
# it as an argument, so that aot_specs() can ask for a GPU's launches on a machine without one.
TARGETS = ("interpret", "gpu", "gpu_tf32")


def launch_target(q) -> str:
    """The target of a launch on q made now: the interpreter under TRITON_INTERPRET=1, else (q on a
    GPU) "gpu_tf32" where PyTorch's TF32 flag for fp32 matmuls (torch.backends.cuda.matmul.allow_tf32)
    is on, "gpu" where it is off."""
    if interpreting():
        return "interpret"
    return "gpu_tf32" if q.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "gpu"


def _kernel_meta(q, target: str):
    if target not in TARGETS:
        raise ValueError(f"attention target must be one of {', '.join(TARGETS)}, got {target!r}")
    B, H, N, d = q.shape
    d0, d1 = head_tiles(d)
    compute = compute_dtype(q)
    # The interpreter computes bf16/fp16 wrongly, so it runs the matmuls on fp32 copies of the tiles.
    dot = compute if (target == "interpret" or q.dtype in (torch.float32, torch.float64)) else q.dtype
    return dict(HEAD_DIM=d, D0=d0, D1=d1, DOT=tl_dtype(dot), COMPUTE=tl_dtype(compute),
                PRECISION=_dot_precision(q, dot, target)), compute


def _dot_precision(q, dot: torch.dtype, target: str | None = None) -> str:
    """"tf32" for fp32 tiles on a GPU where PyTorch's matmuls may use TF32 (as the trainer and the
    sampler set it: torch.backends.cuda.matmul.allow_tf32), like the model's Linear layers then; exact
    "ieee" otherwise (the interpreter, fp64, or TF32 off). bf16/fp16 tiles ignore it. Single-pass TF32 is
    less exact than PyTorch's fp32 SDPA, whose memory-efficient kernel keeps near-fp32 accuracy
    whatever the flag says. `target`: as launch_target(q) by default."""
    if dot == torch.float32 and (target or launch_target(q)) == "gpu_tf32":
        return "tf32"
    return "ieee" if dot in (torch.float32, torch.float64) else "tf32"


def _strides3(x):
    return x.stride()[:3]


def _norm_args(q, norm):
    """Kernel arguments for the optional qk-norm (q weight, q bias, k weight, k bias, eps)."""
    if norm is None:
        return (q, q, q, q), 0.0, False
    return norm[:4], norm[4], True


def _forward(q, k, v, o, scale, norm, target):
    """Fill o (B, H, N, d) and return the base-2 log-sum-exp (B * H, N), launched for `target`."""
    B, H, N, d = q.shape
    meta, compute = _kernel_meta(q, target)
    lse = torch.empty((B * H, N), dtype=compute, device=q.device)
    weights, eps, qk_norm = _norm_args(q, norm)
    block_m, block_n, launch = _launch_config("fwd", q, meta, qk_norm, target)
    _attn_fwd_kernel[(cdiv(N, block_m), B * H)](
        q, k, v, o, lse, *weights, N, H, scale * LOG2E, eps,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
        ALIGN=_alignment(q, k, v, o), BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=N % block_n == 0,
        QK_NORM=qk_norm, **meta, **launch)
    return lse


def _backward(q, k, v, o, lse, do, dq, dk, dv, scale, norm, target):
    """Fill dq, dk, dv (B, H, N, d) from dO, launched for `target`; with qk-norm, return the gradients of
    its q weight, q bias, k weight and k bias (each summed from per-block partials: deterministic)."""
    B, H, N, d = q.shape
    meta, compute = _kernel_meta(q, target)
    delta = torch.empty((B * H, N), dtype=compute, device=q.device)
    _attn_bwd_delta_kernel[(cdiv(N, _DELTA_BLOCK), B * H)](
        o, do, delta, N, H, *_strides3(o), *_strides3(do), ALIGN=_alignment(o, do), BLOCK_M=_DELTA_BLOCK,
        HEAD_DIM=meta["HEAD_DIM"], D0=meta["D0"], D1=meta["D1"], COMPUTE=meta["COMPUTE"])
    align = _alignment(q, k, v, do, dq, dk, dv)
    weights, eps, qk_norm = _norm_args(q, norm)

    def partials(blocks):  # (B * H * blocks, d) per-block sums of the weight and bias gradients
        if not qk_norm:
            return delta, delta
        return tuple(torch.empty((B * H * blocks, d), dtype=compute, device=q.device) for _ in range(2))

    block_m, block_n, launch = _launch_config("dkdv", q, meta, qk_norm, target)
    dkw, dkb = partials(cdiv(N, block_n))
    _attn_bwd_dkdv_kernel[(cdiv(N, block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, *weights, dkw, dkb, N, H, scale * LOG2E, scale, eps,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
        ALIGN=align, BLOCK_M=block_m, BLOCK_N=block_n, QK_NORM=qk_norm, **meta, **launch)
    block_m, block_n, launch = _launch_config("dq", q, meta, qk_norm, target)
    dqw, dqb = partials(cdiv(N, block_m))
    _attn_bwd_dq_kernel[(cdiv(N, block_m), B * H)](
        q, k, v, do, lse, delta, dq, *weights, dqw, dqb, N, H, scale * LOG2E, scale, eps,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
        ALIGN=align, BLOCK_M=block_m, BLOCK_N=block_n, QK_NORM=qk_norm, **meta, **launch)
    if not qk_norm:
        return None, None, None, None
    return tuple(partial.sum(0).to(weight.dtype) for partial, weight in zip((dqw, dqb, dkw, dkb), weights))


def _unit_last_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _heads(x, num_heads):
    """(B, N, H * d) -> (B, H, N, d) view."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _pack_norm(weights, eps):
    if weights[0] is None:
        return None
    return tuple(w.contiguous() for w in weights) + (eps,)


# One registration per op (kernels._autograd): the eager autograd.Function and the torch.compile
# custom op both run these.

def _attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, q_weight: Optional[Tensor],
                       q_bias: Optional[Tensor], k_weight: Optional[Tensor], k_bias: Optional[Tensor],
                       eps: float) -> tuple[Tensor, Tensor]:
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, H, N, d)
    lse = _forward(q, k, v, o, scale, _pack_norm((q_weight, q_bias, k_weight, k_bias), eps), launch_target(q))
    return o, lse


def _attention_backward(saved, grads, needs, scale, eps):
    q, k, v, o, lse, *weights = saved
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    d_norm = _backward(q, k, v, o, lse, _unit_last_stride(grads[0]), dq, dk, dv, scale, _pack_norm(weights, eps),
                       launch_target(q))
    return [dq, dk, dv, *d_norm]


def _fake_grads(tensors):
    return [None if x is None else x.new_empty(x.shape) for x in tensors]


_attention = fused_op(
    "alignflow::attention", forward=_attention_forward, backward=_attention_backward,
    save=lambda inputs, results: (*inputs[:3], *results, *inputs[4:8]),
    fake_forward=lambda q, k, v, scale, q_weight, q_bias, k_weight, k_bias, eps: (
        q.new_empty(q.shape), q.new_empty((q.shape[0] * q.shape[1], q.shape[2]), dtype=compute_dtype(q))),
    fake_backward=lambda saved, grads, needs, scale, eps: _fake_grads((*saved[:3], *saved[5:])))


def _qkv_forward(qkv, num_heads, scale, norm, target):
    """o (B, N, H * d) and the lse of packed `qkv` (B, N, 3 * H * d) with unit stride along its width:
    the kernels read q, k, v as strided views into qkv and write o in the layout the projection reads."""
    B, N, width = qkv.shape
    o = torch.empty((B, N, width // 3), dtype=qkv.dtype, device=qkv.device)  # (B, N, H * d)
    lse = _forward(*split_qkv(qkv, num_heads), _heads(o, num_heads), scale, norm, target)
    return o, lse


def _qkv_backward(qkv, o, lse, do, num_heads, scale, norm, target):
    """d_qkv in the packed layout of `qkv`, and the qk-norm gradients, from dO (B, N, H * d)."""
    d_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, N, 3 * H * d)
    d_norm = _backward(*split_qkv(qkv, num_heads), _heads(o, num_heads), lse, _heads(do, num_heads),
                       *split_qkv(d_qkv, num_heads), scale, norm, target)
    return d_qkv, d_norm


def _attention_qkv_forward(qkv: Tensor, num_heads: int, scale: float, q_weight: Optional[Tensor],
                           q_bias: Optional[Tensor], k_weight: Optional[Tensor], k_bias: Optional[Tensor],
                           eps: float) -> tuple[Tensor, Tensor]:
    norm = _pack_norm((q_weight, q_bias, k_weight, k_bias), eps)
    qkv = _unit_last_stride(qkv)
    return _qkv_forward(qkv, num_heads, scale, norm, launch_target(qkv))


def _attention_qkv_backward(saved, grads, needs, num_heads, scale, eps):
    qkv, o, lse, *weights = saved
    qkv = _unit_last_stride(qkv)
    d_qkv, d_norm = _qkv_backward(qkv, o, lse, _unit_last_stride(grads[0]), num_heads, scale, _pack_norm(weights, eps),
                                  launch_target(qkv))
    return [d_qkv, *d_norm]


_attention_qkv = fused_op(
    "alignflow::attention_qkv", forward=_attention_qkv_forward, backward=_attention_qkv_backward,
    save=lambda inputs, results: (inputs[0], *results, *inputs[3:7]),
    fake_forward=lambda qkv, num_heads, scale, q_weight, q_bias, k_weight, k_bias, eps: (
        qkv.new_empty((*qkv.shape[:2], qkv.shape[2] // 3)),
        qkv.new_empty((qkv.shape[0] * num_heads, qkv.shape[1]), dtype=compute_dtype(qkv))),
    fake_backward=lambda saved, grads, needs, num_heads, scale, eps: _fake_grads((saved[0], *saved[3:])))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _scale(scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale must be a Python number, not a tensor")
    return float(scale)


def _check_norms(head_dim, norms):
    for name, x in norms.items():
        if x is not None and x.shape != (head_dim,):
            raise ValueError(f"{name} must have shape ({head_dim},) (the head dim), got {tuple(x.shape)}")


def _backend_for(op, tensors, head_dim, batch_heads, norms):
    if get_backend() == "torch":
        return "torch"
    given = [x is not None for x in norms.values()]
    if any(given) and not all(given):
        return fallback(op, "the fused qk-norm needs all of q/k norm weight and bias (an affine LayerNorm)")
    if any(x.numel() == 0 for x in tensors):
        return fallback(op, "empty input")
    if batch_heads > 65535:  # the kernels' grid axis 1
        return fallback(op, f"batch * heads = {batch_heads} above the kernel grid's 65535")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return fallback(op, f"head dim {head_dim} outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if tensors[0].dtype == torch.float64 and not interpreting():
        return fallback(op, "fp64 runs the reference on the GPU (the kernel's fp64 path is for CPU tests)")
    return resolve(op, list(tensors) + list(norms.values()),
                   dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16))


def _torch_layer_norm(x, weight, bias, eps):
    """The reference's `_layer_norm` in the dtype that x's and the parameters' dtypes promote to, returned
    in x's: bf16 activations with fp32 weights (mixed precision) normalise in fp32, as autocast's
    layer_norm does (CUDA's layer_norm refuses mixed dtypes; CPU's, which takes them, rounds the weight
    and bias gradients to bf16). With one dtype throughout, the same F.layer_norm call."""
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in (weight, bias) if p is not None], x.dtype)
    return _layer_norm(x.to(dtype), weight, bias, eps).to(x.dtype)


def _pytorch_attention(q, k, v, scale, norms, eps):
    """The "torch" backend: PyTorch's fused SDPA (as the public SiT/REPA code calls it), with qk-norm
    applied first. Same math as `reference_attention`, which stays the specification."""
    if norms["q_norm_weight"] is not None or norms["k_norm_weight"] is not None:
        q = _torch_layer_norm(q, norms["q_norm_weight"], norms["q_norm_bias"], eps).to(v.dtype)
        k = _torch_layer_norm(k, norms["k_norm_weight"], norms["k_norm_bias"], eps).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(q, k, v, scale=None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
              k_norm_bias=None, qk_norm_eps=1e-5):
    """Non-causal softmax(q k^T * scale) v for q, k, v of shape (B, H, N, d); o is (B, H, N, d).
    With qk-norm weights and biases ((d,) each), q and k first get an affine LayerNorm over d."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have one (B, H, N, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    norms = dict(q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias, k_norm_weight=k_norm_weight,
                 k_norm_bias=k_norm_bias)
    _check_norms(q.shape[-1], norms)
    scale = _scale(scale, q.shape[-1])
    if get_backend() == "torch":
        return _pytorch_attention(q, k, v, scale, norms, qk_norm_eps)
    if _backend_for("attention", (q, k, v), q.shape[-1], q.shape[0] * q.shape[1], norms) == "torch":
        return reference_attention(q, k, v, scale, **norms, qk_norm_eps=qk_norm_eps)
    return _attention(q, k, v, scale, *norms.values(), float(qk_norm_eps))


def attention_qkv(qkv, num_heads, scale=None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                  k_norm_bias=None, qk_norm_eps=1e-5):
    """Attention straight from the packed QKV projection (B, N, 3 * H * d) to (B, N, H * d).
    With qk-norm weights and biases ((d,) each), q and k first get an affine LayerNorm over d."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, N, 3 * H * d), got shape {tuple(qkv.shape)}")
    if num_heads <= 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv width {qkv.shape[-1]} is not 3 * num_heads * head_dim for num_heads={num_heads}")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    norms = dict(q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias, k_norm_weight=k_norm_weight,
                 k_norm_bias=k_norm_bias)
    _check_norms(head_dim, norms)
    scale = _scale(scale, head_dim)
    if get_backend() == "torch":
        o = _pytorch_attention(*split_qkv(qkv, num_heads), scale, norms, qk_norm_eps)  # (B, H, N, d)
        return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)
    if _backend_for("attention_qkv", (qkv,), head_dim, qkv.shape[0] * num_heads, norms) == "torch":
        return reference_attention_qkv(qkv, num_heads, scale, **norms, qk_norm_eps=qk_norm_eps)
    return _attention_qkv(qkv, num_heads, scale, *norms.values(), float(qk_norm_eps))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot --only attention)
# ----------------------------------------------------------------------------------------------

# (dtype, head dim, heads, tokens, qk-norm weights' dtype or None, target, forward only) of the
# attention_qkv calls built
_AOT_CASES = (
    (torch.bfloat16, 72, 16, 256, None, "gpu_tf32", False),           # SiT-XL/2
    (torch.bfloat16, 72, 16, 257, None, "gpu_tf32", False),           # SiT-XL/2 with REG's class token
    (torch.bfloat16, 72, 16, 256, torch.float32, "gpu_tf32", False),  # REPA's --qk-norm, bf16-mixed
    (torch.bfloat16, 72, 16, 256, torch.bfloat16, "gpu_tf32", False),  # the same, train.precision bf16
    (torch.bfloat16, 64, 12, 256, None, "gpu_tf32", False),           # SiT-B/2
    (torch.bfloat16, 64, 12, 257, None, "gpu_tf32", True),            # the DINOv2-B encoder (no_grad)
    (torch.bfloat16, 128, 8, 256, None, "gpu_tf32", False),           # a wide head (no SiT preset)
    (torch.float32, 72, 16, 256, None, "gpu", False),                 # TF32 off: exact CUDA-core matmuls
    (torch.float32, 72, 16, 256, None, "gpu_tf32", False),
    (torch.float32, 72, 16, 256, torch.float32, "gpu_tf32", False),
    (torch.float32, 64, 12, 256, None, "gpu_tf32", False),
)
_AOT_KERNELS = ("attention_fwd", "attention_bwd_delta", "attention_bwd_dkdv", "attention_bwd_dq")


def _qk_norm_tag(norm_dtype) -> str:
    if norm_dtype is None:
        return ""
    return ",qk_norm" if norm_dtype == torch.float32 else f",qk_norm_{TRITON_TYPES[norm_dtype]}"


def aot_specs():
    """The launches of attention_qkv (the packed layout SiT and the encoder call), recorded from the
    launchers on meta tensors at the real shapes (batch 32) for a GPU target (_AOT_CASES): forward and
    backward in bf16 at d = 72, 64, 128 (with N = 257, and with fused qk-norm at d = 72, its weights fp32
    as under bf16 autocast and bf16 as in a bf16 model: tagged qk_norm and qk_norm_bf16); fp32 at d = 72
    exact (TF32 off: CUDA-core matmuls, so no wgmma) and with TF32 tensor cores (also with qk-norm), and
    at d = 64 with TF32. Tensor-core builds must show mma.sync on sm_80 and wgmma on sm_90. A build
    already listed (the delta kernel of a qk-norm or TF32 variant) is listed once."""
    module = sys.modules[__name__]
    specs, builds = [], set()
    for dtype, head_dim, heads, N, norm_dtype, target, forward_only in _AOT_CASES:
        qkv = torch.empty(32, N, 3 * heads * head_dim, dtype=dtype, device="meta")
        norm = None
        if norm_dtype is not None:
            norm = (*(torch.empty(head_dim, dtype=norm_dtype, device="meta") for _ in range(4)), 1e-5)
        scale = head_dim ** -0.5
        with recorded_launches(module) as launches:
            o, lse = _qkv_forward(qkv, heads, scale, norm, target)
            if not forward_only:
                _qkv_backward(qkv, o, lse, torch.empty_like(o), heads, scale, norm, target)
        precision = launches[0].kwargs["PRECISION"]
        tag = (f"{TRITON_TYPES[dtype]},d={head_dim}" + ("" if dtype != torch.float32 else f",{precision}")
               + _qk_norm_tag(norm_dtype) + (f",N={N}" if N % 16 else ""))
        tensor_cores = {80: ("mma.sync.aligned",), 90: ("wgmma",)} if precision == "tf32" else {}
        for kernel, launch in zip(_AOT_KERNELS[:1] if forward_only else _AOT_KERNELS, launches, strict=True):
            spec = launch_spec(f"{kernel}[{tag}]", launch,
                               require_ptx={} if kernel == "attention_bwd_delta" else tensor_cores)
            build = repr(dataclasses.replace(spec, name=""))
            if build not in builds:
                builds.add(build)
                specs.append(spec)
    return specs
