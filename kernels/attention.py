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

qk-norm (REPA's --qk-norm: LayerNorm over the head dim of q and k with affine weight and bias,
as timm's Attention does) is part of the reference; it is not fused into the kernels yet, so calls
that pass qk-norm weights run the reference (logged once).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import fallback, get_backend, interpreting, resolve
from ._util import AotSpec, compute_dtype, tl_dtype

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
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, N, H, qk_scale,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    DOT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    q_base = _head_base(q_ptr, bh, H, sqb, sqh, ALIGN)
    k_base = _head_base(k_ptr, bh, H, skb, skh, ALIGN)
    v_base = _head_base(v_ptr, bh, H, svb, svh, ALIGN)
    o_base = _head_base(o_ptr, bh, H, sob, soh, ALIGN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    q0 = _load_tile(q_base, rows, row_mask, sqn, 0, D0, HEAD_DIM, ALIGN, DOT)  # (BLOCK_M, D0)
    if D1 > 0:
        q1 = _load_tile(q_base, rows, row_mask, sqn, D0, D1, HEAD_DIM, ALIGN, DOT)  # (BLOCK_M, D1)
    m_i = tl.full([BLOCK_M], float("-inf"), COMPUTE)  # running max of s * scale * log2 e
    l_i = tl.zeros([BLOCK_M], COMPUTE)  # running sum of exp2(. - m_i)
    acc0 = tl.zeros([BLOCK_M, D0], COMPUTE)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_M, D1], COMPUTE)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        s = tl.dot(q0, _load_tile_t(k_base, cols, col_mask, skn, 0, D0, HEAD_DIM, ALIGN, DOT),
                   input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if D1 > 0:
            s = tl.dot(q1, _load_tile_t(k_base, cols, col_mask, skn, D0, D1, HEAD_DIM, ALIGN, DOT), acc=s,
                       input_precision=PRECISION)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_dot = p.to(DOT)
        acc0 = tl.dot(p_dot, _load_tile(v_base, cols, col_mask, svn, 0, D0, HEAD_DIM, ALIGN, DOT),
                      acc=acc0 * alpha[:, None], input_precision=PRECISION)
        if D1 > 0:
            acc1 = tl.dot(p_dot, _load_tile(v_base, cols, col_mask, svn, D0, D1, HEAD_DIM, ALIGN, DOT),
                          acc=acc1 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    inv_l = 1.0 / l_i
    _store_tile(o_base, rows, row_mask, son, acc0 * inv_l[:, None], 0, D0, HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(o_base, rows, row_mask, son, acc1 * inv_l[:, None], D0, D1, HEAD_DIM, ALIGN)
    tl.store(lse_ptr + bh.to(tl.int64) * N + rows, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, N, H, sob, soh, son, sdob, sdoh, sdon,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax backward's per-row correction."""
    bh = tl.program_id(1)
    o_base = _head_base(o_ptr, bh, H, sob, soh, ALIGN)
    do_base = _head_base(do_ptr, bh, H, sdob, sdoh, ALIGN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    delta = tl.sum(_load_tile(o_base, rows, row_mask, son, 0, D0, HEAD_DIM, ALIGN, COMPUTE)
                   * _load_tile(do_base, rows, row_mask, sdon, 0, D0, HEAD_DIM, ALIGN, COMPUTE), 1)
    if D1 > 0:
        delta += tl.sum(_load_tile(o_base, rows, row_mask, son, D0, D1, HEAD_DIM, ALIGN, COMPUTE)
                        * _load_tile(do_base, rows, row_mask, sdon, D0, D1, HEAD_DIM, ALIGN, COMPUTE), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * N + rows, delta, mask=row_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, N, H, qk_scale, scale,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key block: dv = sum_i P^T dO, dk = scale * sum_i dS^T Q over all query blocks i.
    Works on transposed scores (BLOCK_N, BLOCK_M) so no register tile needs a transpose."""
    bh = tl.program_id(1)
    q_base = _head_base(q_ptr, bh, H, sqb, sqh, ALIGN)
    k_base = _head_base(k_ptr, bh, H, skb, skh, ALIGN)
    v_base = _head_base(v_ptr, bh, H, svb, svh, ALIGN)
    do_base = _head_base(do_ptr, bh, H, sdob, sdoh, ALIGN)
    stats = bh.to(tl.int64) * N
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # Keys past N load as zero; their dk, dv are never stored.
    k0 = _load_tile(k_base, cols, col_mask, skn, 0, D0, HEAD_DIM, ALIGN, DOT)  # (BLOCK_N, D0)
    v0 = _load_tile(v_base, cols, col_mask, svn, 0, D0, HEAD_DIM, ALIGN, DOT)
    dk0 = tl.zeros([BLOCK_N, D0], COMPUTE)
    dv0 = tl.zeros([BLOCK_N, D0], COMPUTE)
    if D1 > 0:
        k1 = _load_tile(k_base, cols, col_mask, skn, D0, D1, HEAD_DIM, ALIGN, DOT)  # (BLOCK_N, D1)
        v1 = _load_tile(v_base, cols, col_mask, svn, D0, D1, HEAD_DIM, ALIGN, DOT)
        dk1 = tl.zeros([BLOCK_N, D1], COMPUTE)
        dv1 = tl.zeros([BLOCK_N, D1], COMPUTE)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        qT0 = _load_tile_t(q_base, rows, row_mask, sqn, 0, D0, HEAD_DIM, ALIGN, DOT)  # (D0, BLOCK_M)
        sT = tl.dot(k0, qT0, input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        if D1 > 0:
            qT1 = _load_tile_t(q_base, rows, row_mask, sqn, D0, D1, HEAD_DIM, ALIGN, DOT)
            sT = tl.dot(k1, qT1, acc=sT, input_precision=PRECISION)
        # Queries past N get lse = +inf, so P = 0 and they add nothing.
        lse = tl.load(lse_ptr + stats + rows, mask=row_mask, other=float("inf"))
        pT = tl.exp2(sT * qk_scale - lse[None, :])
        pT_dot = pT.to(DOT)
        do0 = _load_tile(do_base, rows, row_mask, sdon, 0, D0, HEAD_DIM, ALIGN, DOT)  # (BLOCK_M, D0)
        dv0 = tl.dot(pT_dot, do0, acc=dv0, input_precision=PRECISION)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        if D1 > 0:
            do1 = _load_tile(do_base, rows, row_mask, sdon, D0, D1, HEAD_DIM, ALIGN, DOT)
            dv1 = tl.dot(pT_dot, do1, acc=dv1, input_precision=PRECISION)
            dpT = tl.dot(v1, tl.trans(do1), acc=dpT, input_precision=PRECISION)
        delta = tl.load(delta_ptr + stats + rows, mask=row_mask, other=0.0)
        dsT = (pT * (dpT - delta[None, :])).to(DOT)
        dk0 = tl.dot(dsT, tl.trans(qT0), acc=dk0, input_precision=PRECISION)
        if D1 > 0:
            dk1 = tl.dot(dsT, tl.trans(qT1), acc=dk1, input_precision=PRECISION)
    dk_base = _head_base(dk_ptr, bh, H, sdkb, sdkh, ALIGN)
    dv_base = _head_base(dv_ptr, bh, H, sdvb, sdvh, ALIGN)
    _store_tile(dk_base, cols, col_mask, sdkn, dk0 * scale, 0, D0, HEAD_DIM, ALIGN)
    _store_tile(dv_base, cols, col_mask, sdvn, dv0, 0, D0, HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(dk_base, cols, col_mask, sdkn, dk1 * scale, D0, D1, HEAD_DIM, ALIGN)
        _store_tile(dv_base, cols, col_mask, sdvn, dv1, D0, D1, HEAD_DIM, ALIGN)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, N, H, qk_scale, scale,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block: dq = scale * sum_j dS K over all key blocks j."""
    bh = tl.program_id(1)
    q_base = _head_base(q_ptr, bh, H, sqb, sqh, ALIGN)
    k_base = _head_base(k_ptr, bh, H, skb, skh, ALIGN)
    v_base = _head_base(v_ptr, bh, H, svb, svh, ALIGN)
    do_base = _head_base(do_ptr, bh, H, sdob, sdoh, ALIGN)
    stats = bh.to(tl.int64) * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    q0 = _load_tile(q_base, rows, row_mask, sqn, 0, D0, HEAD_DIM, ALIGN, DOT)  # (BLOCK_M, D0)
    do0 = _load_tile(do_base, rows, row_mask, sdon, 0, D0, HEAD_DIM, ALIGN, DOT)
    dq0 = tl.zeros([BLOCK_M, D0], COMPUTE)
    if D1 > 0:
        q1 = _load_tile(q_base, rows, row_mask, sqn, D0, D1, HEAD_DIM, ALIGN, DOT)  # (BLOCK_M, D1)
        do1 = _load_tile(do_base, rows, row_mask, sdon, D0, D1, HEAD_DIM, ALIGN, DOT)
        dq1 = tl.zeros([BLOCK_M, D1], COMPUTE)
    lse = tl.load(lse_ptr + stats + rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + stats + rows, mask=row_mask, other=0.0)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        # Keys past N load as zero rows of K, so whatever dS they get adds exactly 0 to dq.
        kT0 = _load_tile_t(k_base, cols, col_mask, skn, 0, D0, HEAD_DIM, ALIGN, DOT)  # (D0, BLOCK_N)
        s = tl.dot(q0, kT0, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do0, _load_tile_t(v_base, cols, col_mask, svn, 0, D0, HEAD_DIM, ALIGN, DOT),
                    input_precision=PRECISION)
        if D1 > 0:
            kT1 = _load_tile_t(k_base, cols, col_mask, skn, D0, D1, HEAD_DIM, ALIGN, DOT)
            s = tl.dot(q1, kT1, acc=s, input_precision=PRECISION)
            dp = tl.dot(do1, _load_tile_t(v_base, cols, col_mask, svn, D0, D1, HEAD_DIM, ALIGN, DOT),
                        acc=dp, input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        ds = (p * (dp - delta[:, None])).to(DOT)
        dq0 = tl.dot(ds, tl.trans(kT0), acc=dq0, input_precision=PRECISION)
        if D1 > 0:
            dq1 = tl.dot(ds, tl.trans(kT1), acc=dq1, input_precision=PRECISION)
    dq_base = _head_base(dq_ptr, bh, H, sdqb, sdqh, ALIGN)
    _store_tile(dq_base, rows, row_mask, sdqn, dq0 * scale, 0, D0, HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(dq_base, rows, row_mask, sdqn, dq1 * scale, D0, D1, HEAD_DIM, ALIGN)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def head_tiles(head_dim: int) -> tuple[int, int]:
    """(D0, D1): the largest power of two <= head_dim, and a power-of-two tail (>= 16, or 0 if none)
    covering the rest. 64 -> (64, 0), 72 -> (64, 16), 96 -> (64, 32), 128 -> (128, 0)."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest else 0)


# Launch configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages). The GPU values come from a sweep
# of the sm_80/sm_90 AOT builds for d = 64, 72, 128 (python -m kernels.aot --only attention): the
# largest tiles tried whose builds use no stack (local memory) on either arch. The backward at
# 64 x 64 tiles puts stack frames of 72-200 bytes on sm_80 at d = 72 and 128. Not yet tuned by timing.
# The interpreter gets small tiles (every tile op is a numpy call).
_GPU_FWD = (128, 64, 8, 3)
_GPU_BWD = {"dkdv": (32, 64, 8, 2), "dq": (64, 32, 8, 2)}  # dkdv: (query block, key block)
_INTERPRET_BLOCK = 32
_DELTA_BLOCK = 64


def _alignment(*tensors) -> int:
    """8 when every tensor starts on 16 bytes and every batch/head/row stride is a multiple of 8
    elements, so every row starts on 16 bytes and loads vectorise (with d = 72, or q, k, v inside a
    packed qkv, the compiler cannot see that from its own argument checks), else 1."""
    aligned = all(t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:3]) for t in tensors)
    return 8 if aligned else 1


def _kernel_meta(q):
    B, H, N, d = q.shape
    d0, d1 = head_tiles(d)
    compute = compute_dtype(q)
    # The interpreter computes bf16/fp16 wrongly, so it runs the matmuls on fp32 copies of the tiles.
    dot = compute if (interpreting() or q.dtype in (torch.float32, torch.float64)) else q.dtype
    return dict(HEAD_DIM=d, D0=d0, D1=d1, DOT=tl_dtype(dot), COMPUTE=tl_dtype(compute),
                PRECISION="ieee" if dot in (torch.float32, torch.float64) else "tf32"), compute


def _strides3(x):
    return x.stride()[:3]


def _forward(q, k, v, o, scale):
    """Fill o (B, H, N, d) and return the base-2 log-sum-exp (B * H, N)."""
    B, H, N, d = q.shape
    meta, compute = _kernel_meta(q)
    lse = torch.empty((B * H, N), dtype=compute, device=q.device)
    if interpreting():
        block_m = block_n = _INTERPRET_BLOCK
        launch = {}
    else:
        block_m, block_n, num_warps, num_stages = _GPU_FWD
        launch = dict(num_warps=num_warps, num_stages=num_stages)
    _attn_fwd_kernel[(triton.cdiv(N, block_m), B * H)](
        q, k, v, o, lse, N, H, scale * LOG2E,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
        ALIGN=_alignment(q, k, v, o), BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=N % block_n == 0,
        **meta, **launch)
    return lse


def _backward(q, k, v, o, lse, do, dq, dk, dv, scale):
    """Fill dq, dk, dv (B, H, N, d) from dO."""
    B, H, N, d = q.shape
    meta, compute = _kernel_meta(q)
    delta = torch.empty((B * H, N), dtype=compute, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(N, _DELTA_BLOCK), B * H)](
        o, do, delta, N, H, *_strides3(o), *_strides3(do), ALIGN=_alignment(o, do), BLOCK_M=_DELTA_BLOCK,
        HEAD_DIM=meta["HEAD_DIM"], D0=meta["D0"], D1=meta["D1"], COMPUTE=meta["COMPUTE"])
    align = _alignment(q, k, v, do, dq, dk, dv)
    configs = {}
    for name in ("dkdv", "dq"):
        if interpreting():
            configs[name] = (_INTERPRET_BLOCK, _INTERPRET_BLOCK, {})
        else:
            block_m, block_n, num_warps, num_stages = _GPU_BWD[name]
            configs[name] = (block_m, block_n, dict(num_warps=num_warps, num_stages=num_stages))
    block_m, block_n, launch = configs["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(N, block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, N, H, scale * LOG2E, scale,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
        ALIGN=align, BLOCK_M=block_m, BLOCK_N=block_n, **meta, **launch)
    block_m, block_n, launch = configs["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(N, block_m), B * H)](
        q, k, v, do, lse, delta, dq, N, H, scale * LOG2E, scale,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
        ALIGN=align, BLOCK_M=block_m, BLOCK_N=block_n, **meta, **launch)


def _unit_last_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _heads(x, num_heads):
    """(B, N, H * d) -> (B, H, N, d) view."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, H, N, d)
        lse = _forward(q, k, v, o, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
        _backward(q, k, v, o, lse, _unit_last_stride(do), dq, dk, dv, ctx.scale)
        return dq, dk, dv, None


class _AttentionQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_heads, scale):
        qkv = _unit_last_stride(qkv)
        B, N, width = qkv.shape
        q, k, v = split_qkv(qkv, num_heads)  # strided (B, H, N, d) views into qkv
        o = torch.empty((B, N, width // 3), dtype=qkv.dtype, device=qkv.device)  # (B, N, H * d)
        lse = _forward(q, k, v, _heads(o, num_heads), scale)
        ctx.save_for_backward(qkv, o, lse)
        ctx.meta = (num_heads, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        num_heads, scale = ctx.meta
        d_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (B, N, 3 * H * d)
        _backward(*split_qkv(qkv, num_heads), _heads(o, num_heads), lse,
                  _heads(_unit_last_stride(do), num_heads), *split_qkv(d_qkv, num_heads), scale)
        return d_qkv, None, None


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


def _backend_for(op, tensors, head_dim, norms):
    if get_backend() == "torch":
        return "torch"
    if any(x is not None for x in norms.values()):
        return fallback(op, "qk-norm is not fused into the Triton kernel yet")
    if any(x.numel() == 0 for x in tensors):
        return fallback(op, "empty input")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return fallback(op, f"head dim {head_dim} outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if tensors[0].dtype == torch.float64 and not interpreting():
        return fallback(op, "fp64 runs the reference on the GPU (the kernel's fp64 path is for CPU tests)")
    return resolve(op, tensors, dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16))


def attention(q, k, v, scale=None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
              k_norm_bias=None, qk_norm_eps=1e-5):
    """Non-causal softmax(q k^T * scale) v for q, k, v of shape (B, H, N, d); o is (B, H, N, d)."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have one (B, H, N, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    norms = dict(q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias, k_norm_weight=k_norm_weight,
                 k_norm_bias=k_norm_bias)
    _check_norms(q.shape[-1], norms)
    scale = _scale(scale, q.shape[-1])
    if _backend_for("attention", (q, k, v), q.shape[-1], norms) == "torch":
        return reference_attention(q, k, v, scale, **norms, qk_norm_eps=qk_norm_eps)
    return _Attention.apply(q, k, v, scale)


def attention_qkv(qkv, num_heads, scale=None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                  k_norm_bias=None, qk_norm_eps=1e-5):
    """Attention straight from the packed QKV projection (B, N, 3 * H * d) to (B, N, H * d)."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, N, 3 * H * d), got shape {tuple(qkv.shape)}")
    if num_heads <= 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv width {qkv.shape[-1]} is not 3 * num_heads * head_dim for num_heads={num_heads}")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    norms = dict(q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias, k_norm_weight=k_norm_weight,
                 k_norm_bias=k_norm_bias)
    _check_norms(head_dim, norms)
    scale = _scale(scale, head_dim)
    if _backend_for("attention_qkv", (qkv,), head_dim, norms) == "torch":
        return reference_attention_qkv(qkv, num_heads, scale, **norms, qk_norm_eps=qk_norm_eps)
    return _AttentionQKV.apply(qkv, num_heads, scale)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot --only attention)
# ----------------------------------------------------------------------------------------------

def _stride_args(*names):
    return {f"s{name}{axis}": "i32" for name in names for axis in "bhn"}


def aot_specs(head_dims=(64, 72, 128), dtype="bf16"):
    specs = []
    for head_dim in head_dims:
        d0, d1 = head_tiles(head_dim)
        meta = dict(HEAD_DIM=head_dim, D0=d0, D1=d1, ALIGN=8, COMPUTE=tl.float32)
        dot = dict(DOT=tl_dtype({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]), PRECISION="tf32")
        block_m, block_n, num_warps, num_stages = _GPU_FWD
        specs.append(AotSpec(
            f"attention_fwd[{dtype},d={head_dim}]", _attn_fwd_kernel,
            {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "o_ptr": f"*{dtype}",
             "lse_ptr": "*fp32", "N": "i32", "H": "i32", "qk_scale": "fp32", **_stride_args("q", "k", "v", "o")},
            dict(meta, **dot, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=False),
            num_warps=num_warps, num_stages=num_stages, require_ptx={90: ("wgmma",)}))
        specs.append(AotSpec(
            f"attention_bwd_delta[{dtype},d={head_dim}]", _attn_bwd_delta_kernel,
            {"o_ptr": f"*{dtype}", "do_ptr": f"*{dtype}", "delta_ptr": "*fp32", "N": "i32", "H": "i32",
             **_stride_args("o", "do")},
            dict(meta, BLOCK_M=_DELTA_BLOCK)))
        block_m, block_n, num_warps, num_stages = _GPU_BWD["dkdv"]
        specs.append(AotSpec(
            f"attention_bwd_dkdv[{dtype},d={head_dim}]", _attn_bwd_dkdv_kernel,
            {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "do_ptr": f"*{dtype}",
             "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": f"*{dtype}", "dv_ptr": f"*{dtype}",
             "N": "i32", "H": "i32", "qk_scale": "fp32", "scale": "fp32",
             **_stride_args("q", "k", "v", "do", "dk", "dv")},
            dict(meta, **dot, BLOCK_M=block_m, BLOCK_N=block_n),
            num_warps=num_warps, num_stages=num_stages, require_ptx={90: ("wgmma",)}))
        block_m, block_n, num_warps, num_stages = _GPU_BWD["dq"]
        specs.append(AotSpec(
            f"attention_bwd_dq[{dtype},d={head_dim}]", _attn_bwd_dq_kernel,
            {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "do_ptr": f"*{dtype}",
             "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": f"*{dtype}",
             "N": "i32", "H": "i32", "qk_scale": "fp32", "scale": "fp32",
             **_stride_args("q", "k", "v", "do", "dq")},
            dict(meta, **dot, BLOCK_M=block_m, BLOCK_N=block_n),
            num_warps=num_warps, num_stages=num_stages, require_ptx={90: ("wgmma",)}))
    return specs
