"""REPA alignment loss: negative cosine similarity of projector outputs and encoder tokens.

    loss_b = - 1/E sum_e 1/N sum_n <p, q> / (max(|p|, eps) max(|q|, eps))     eps = 1e-12

with p = z_pred[e][b, n], q = z_target[e][b, n]; the same normalisation as `F.normalize`, always in
fp32 (fp64 for fp64 inputs) whatever the input dtype: REPA users report fp16 NaN from normalising in
half precision. The forward kernel reads each row once and keeps (cos, |p|, |q|) per row in fp32; the
backward kernel reads the rows once more and writes dp (and dq when the target requires grad).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _cuda
from ._autograd import fused_op
from ._backend import fallback, resolve
from ._util import (TRITON_TYPES, cdiv, compute_dtype, launch_spec, next_power_of_2, recorded_launches,
                    reduce_per_sample, tl_dtype)

EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------

def _pairs(z_pred, z_target):
    if isinstance(z_pred, torch.Tensor) != isinstance(z_target, torch.Tensor):
        raise TypeError("z_pred and z_target must both be tensors or both be lists of tensors")
    if isinstance(z_pred, torch.Tensor):
        z_pred, z_target = [z_pred], [z_target]
    if len(z_pred) != len(z_target) or len(z_pred) == 0:
        raise ValueError(f"need equal, non-zero numbers of predictions and targets, got {len(z_pred)} "
                         f"and {len(z_target)}")
    for i, (p, q) in enumerate(zip(z_pred, z_target)):
        if p.dim() != 3 or p.shape != q.shape:
            raise ValueError(f"encoder {i}: z_pred {tuple(p.shape)} and z_target {tuple(q.shape)} must be "
                             "equal (B, N, D) shapes")
        if p.shape[0] != z_pred[0].shape[0]:
            raise ValueError(f"encoder {i}: batch {p.shape[0]} differs from encoder 0's {z_pred[0].shape[0]}")
    return list(zip(z_pred, z_target))


def reference_alignment_loss(z_pred, z_target, reduction="mean"):
    """REPA's projection loss, per sample (reduction="none") or averaged over the batch."""
    per_sample = 0
    pairs = _pairs(z_pred, z_target)
    for p, q in pairs:
        dtype = compute_dtype(p, q)
        cos = (F.normalize(p.to(dtype), dim=-1, eps=EPS) * F.normalize(q.to(dtype), dim=-1, eps=EPS)).sum(-1)
        per_sample = per_sample - cos.mean(1)
    return reduce_per_sample(per_sample / len(pairs), reduction)




# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _alignment_fwd_kernel(
    p_ptr, q_ptr, stats_ptr, R, D, stride_p_row, stride_p_d, stride_q_row, stride_q_d,
    EPS_: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    dot = tl.zeros([BLOCK_R], dtype=COMPUTE)
    pp = tl.zeros([BLOCK_R], dtype=COMPUTE)
    qq = tl.zeros([BLOCK_R], dtype=COMPUTE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        p = tl.load(p_ptr + rows[:, None] * stride_p_row + d[None, :] * stride_p_d, mask=mask, other=0.0).to(COMPUTE)
        q = tl.load(q_ptr + rows[:, None] * stride_q_row + d[None, :] * stride_q_d, mask=mask, other=0.0).to(COMPUTE)
        dot += tl.sum(p * q, axis=1)
        pp += tl.sum(p * p, axis=1)
        qq += tl.sum(q * q, axis=1)
    p_norm = tl.sqrt(pp)
    q_norm = tl.sqrt(qq)
    cos = dot / (tl.maximum(p_norm, EPS_) * tl.maximum(q_norm, EPS_))
    # stats: (3, R) = cos, |p|, |q|
    tl.store(stats_ptr + rows, cos, mask=row_mask)
    tl.store(stats_ptr + R + rows, p_norm, mask=row_mask)
    tl.store(stats_ptr + 2 * R + rows, q_norm, mask=row_mask)


@triton.jit
def _alignment_bwd_kernel(
    p_ptr, q_ptr, stats_ptr, g_ptr, dp_ptr, dq_ptr, R, D, stride_p_row, stride_p_d, stride_q_row, stride_q_d,
    EPS_: tl.constexpr, D_Q: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    cos = tl.load(stats_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
    p_norm = tl.load(stats_ptr + R + rows, mask=row_mask, other=1.0).to(COMPUTE)
    q_norm = tl.load(stats_ptr + 2 * R + rows, mask=row_mask, other=1.0).to(COMPUTE)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)  # d loss / d cos
    p_den = tl.maximum(p_norm, EPS_)
    q_den = tl.maximum(q_norm, EPS_)
    # d cos/dp = q / (|p| |q|) - cos p / |p|^2, where the norm is not clamped (clamp_min passes no grad)
    p_self = tl.where(p_norm >= EPS_, g * cos / (p_den * p_den), 0.0)
    q_self = tl.where(q_norm >= EPS_, g * cos / (q_den * q_den), 0.0)
    cross = g / (p_den * q_den)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        p = tl.load(p_ptr + rows[:, None] * stride_p_row + d[None, :] * stride_p_d, mask=mask, other=0.0).to(COMPUTE)
        q = tl.load(q_ptr + rows[:, None] * stride_q_row + d[None, :] * stride_q_d, mask=mask, other=0.0).to(COMPUTE)
        out = rows[:, None] * D + d[None, :]
        dp = cross[:, None] * q - p_self[:, None] * p
        tl.store(dp_ptr + out, dp.to(dp_ptr.dtype.element_ty), mask=mask)
        if D_Q:
            dq = cross[:, None] * p - q_self[:, None] * q
            tl.store(dq_ptr + out, dq.to(dq_ptr.dtype.element_ty), mask=mask)


def _blocks(D: int):
    block_d = min(next_power_of_2(D), 1024)
    block_r = max(1, min(16, 4096 // block_d))  # about 4096 elements per tile and per load
    return block_r, block_d


def _alignment_forward(p, q):
    """Per-token cosine (B, N) and the fp32 stats (3, B * N) = (cos, |p|, |q|) the backward reads."""
    if _cuda.supports_alignment(p, q):  # set_backend("cuda")
        return _cuda.alignment_forward(p, q, EPS)
    B, N, D = p.shape
    p2, q2 = p.reshape(B * N, D), q.reshape(B * N, D)
    compute = compute_dtype(p, q)
    stats = torch.empty((3, B * N), dtype=compute, device=p.device)
    block_r, block_d = _blocks(D)
    _alignment_fwd_kernel[(cdiv(B * N, block_r),)](
        p2, q2, stats, B * N, D, *p2.stride(), *q2.stride(),
        EPS_=EPS, COMPUTE=tl_dtype(compute), BLOCK_R=block_r, BLOCK_D=block_d)
    return stats[0].view(B, N).clone(), stats


def _alignment_backward(g_cos, p, q, stats, need_dq: bool):
    if stats.dtype == torch.float32 and _cuda.supports_alignment(p, q):
        return _cuda.alignment_backward(g_cos, p, q, stats, need_dq, EPS)
    B, N, D = p.shape
    p2, q2 = p.reshape(B * N, D), q.reshape(B * N, D)
    g_rows = g_cos.reshape(B * N).contiguous()  # d loss / d cos per token
    dp = torch.empty((B, N, D), dtype=p.dtype, device=p.device)
    dq = torch.empty((B, N, D), dtype=q.dtype, device=q.device) if need_dq else None
    block_r, block_d = _blocks(D)
    _alignment_bwd_kernel[(cdiv(B * N, block_r),)](
        p2, q2, stats, g_rows, dp, dq if need_dq else dp, B * N, D, *p2.stride(), *q2.stride(),
        EPS_=EPS, D_Q=need_dq, COMPUTE=tl_dtype(stats.dtype), BLOCK_R=block_r, BLOCK_D=block_d)
    return dp, dq


def _cos_forward(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    return _alignment_forward(p, q)


def _cos_backward(saved, grads, needs):
    p, q, stats = saved
    return list(_alignment_backward(grads[0], p, q, stats, needs[1]))


# Per-token cosine similarity (B, N) of one encoder's prediction and target, one registration for
# eager and torch.compile (kernels._autograd).
_alignment_cos = fused_op(
    "alignflow::alignment_cos", forward=_cos_forward, backward=_cos_backward,
    save=lambda inputs, results: (inputs[0], inputs[1], results[1]),
    fake_forward=lambda p, q: (p.new_empty(p.shape[:2], dtype=compute_dtype(p, q)),
                               p.new_empty((3, p.shape[0] * p.shape[1]), dtype=compute_dtype(p, q))),
    fake_backward=lambda saved, grads, needs: [saved[0].new_empty(saved[0].shape),
                                               saved[1].new_empty(saved[1].shape) if needs[1] else None])


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def alignment_loss(z_pred, z_target, reduction="mean"):
    """REPA alignment loss for one encoder's (B, N, D) tensors or equal-length lists of them."""
    pairs = _pairs(z_pred, z_target)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    tensors = [x for pair in pairs for x in pair]
    if any(p.numel() == 0 for p, _ in pairs):
        backend = fallback("alignment_loss", "empty input")
    else:
        backend = resolve("alignment_loss", tensors,
                          dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16))
    if backend == "torch":
        return reference_alignment_loss(z_pred, z_target, reduction)
    per_sample = 0
    for p, q in pairs:
        cos = _alignment_cos(p, q)
        per_sample = per_sample - cos.mean(1)
    return reduce_per_sample(per_sample / len(pairs), reduction)


def aot_specs():
    """The launches of a training step, recorded from the launchers at REPA's shapes (batch 32, 256
    tokens; DINOv2-B's 768 and a 1024 width), bf16 and fp32."""
    module = sys.modules[__name__]
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        for D in (768, 1024):
            p, q = (torch.empty(32, 256, D, dtype=dtype, device="meta") for _ in range(2))
            with recorded_launches(module) as launches:
                _, stats = _alignment_forward(p, q)
                _alignment_backward(torch.empty(32, 256, device="meta"), p, q, stats, need_dq=True)
            tag = f"{TRITON_TYPES[dtype]},D={D}"
            specs += [launch_spec(f"alignment_fwd[{tag}]", launches[0], min_load_bits=128),
                      launch_spec(f"alignment_bwd[{tag}]", launches[1], min_load_bits=128)]
    return specs
