"""SiT's MLP, y = fc2(GELU_tanh(fc1(x))): the GELU in fc1's matmul epilogue, GELU' in dL/dg's.

    mlp_gelu(x, W1, b1, W2, b2)      a = x @ W1^T + b1,  g = GELU_tanh(a),  y = g @ W2^T (+ b2)

Forward: one Triton matmul (fp32 accumulation) writes both g (fc2's input) and a (what the backward
reads), so the separate GELU pass (read a, write g) is gone; fc2 is cuBLAS. Backward: the Triton matmul
dL/dg = dL/dy @ W2 applies the GELU derivative in its epilogue (dL/da = dL/dg * GELU'(a), reading a), so
dL/dg is never written, and sums fc1's bias gradient as per-row-tile partial sums (no atomics: torch
sums the tiles in a fixed order, bitwise deterministic, as kernels.gelu does); the weight gradients and
dL/dx are plain torch matmuls (cuBLAS). bf16 and fp32 inputs; other dtypes run the reference.

The GELU math is kernels.gelu's (gelu_tanh_inner/derivative). Intermediates are rounded as the
reference stores them: g is GELU of a as stored (a's dtype), dL/da the derivative times dL/dg rounded
to a's dtype, and fc1's bias gradient sums dL/da as stored (in fp32).

Opt-in (SiT's `model.mlp_kernel: triton`): a new matmul kernel of ours becomes the default only after a
GPU measurement shows it at least as fast as cuBLAS at SiT's shapes; none has been made.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._autograd import fused_op
from ._backend import fallback, resolve
from ._util import TRITON_TYPES, cdiv, launch_spec, recorded_launches, tl_dtype
from .attention import launch_target
from .gelu import gelu_tanh_derivative, gelu_tanh_inner

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------

def reference_linear_gelu(x, weight, bias=None):
    """(g, a): a = F.linear(x, weight, bias), g = F.gelu(a, approximate="tanh"). An fp32 bias with
    lower-precision x and weight (a bf16-mixed model's parameter) is cast to x's dtype, as autocast
    casts it."""
    a = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    return F.gelu(a, approximate="tanh"), a


def reference_mlp_gelu(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias=None):
    """fc2(GELU_tanh(fc1(x))) as nn.Linear + F.gelu + nn.Linear compute it (fc2_bias None: no bias)."""
    g, _ = reference_linear_gelu(x, fc1_weight, fc1_bias)
    return F.linear(g, fc2_weight, fc2_bias)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program; GROUP_M row blocks walk the columns together so that
    the tiles running at once share their W tiles in L2."""
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (pid % group_size), (pid % (GROUP_M * blocks_n)) // group_size


@triton.jit
def _linear_gelu_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, g_ptr, a_ptr,
    M, N, K, stride_x_row, stride_w_row, stride_out_row,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tile_m, tile_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + ks
        x = tl.load(x_ptr + rows[:, None] * stride_x_row + kk[None, :],
                    mask=row_mask[:, None] & (kk < K)[None, :], other=0.0)               # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + cols[None, :] * stride_w_row + kk[:, None],
                    mask=col_mask[None, :] & (kk < K)[:, None], other=0.0)               # (BLOCK_K, BLOCK_N) of W^T
        acc = tl.dot(x.to(DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:  # an fp32 bias with bf16 operands is rounded to bf16 first, as autocast's F.linear rounds it
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(a_ptr.dtype.element_ty)
        acc += bias.to(tl.float32)[None, :]
    a = acc.to(a_ptr.dtype.element_ty)
    pre = a.to(tl.float32)  # GELU of a as stored, as F.gelu reads fc1's output
    g = 0.5 * pre * (1.0 + gelu_tanh_inner(pre))
    offsets = rows[:, None] * stride_out_row + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(a_ptr + offsets, a, mask=mask)
    tl.store(g_ptr + offsets, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_gelu_bwd_kernel(
    dy_ptr, w_ptr, a_ptr, da_ptr, partial_ptr,
    M, N, K, stride_dy_row, stride_w_row, stride_a_row,
    BIAS_GRAD: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dL/da = (dL/dy @ W2) * GELU'(a) for dL/dy (M, K), W2 (K, N) (fc2's weight, K = fc2's outputs),
    a (M, N); with BIAS_GRAD the column sums of this tile's dL/da to partial[tile row block]."""
    tile_m, tile_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + ks
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + kk[None, :],
                     mask=row_mask[:, None] & (kk < K)[None, :], other=0.0)              # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + kk[:, None] * stride_w_row + cols[None, :],
                    mask=(kk < K)[:, None] & col_mask[None, :], other=0.0)               # (BLOCK_K, BLOCK_N)
        acc = tl.dot(dy.to(DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=tl.float32)
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows[:, None] * stride_a_row + cols[None, :]
    pre = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dg = acc.to(da_ptr.dtype.element_ty).to(tl.float32)  # dL/dg as the reference's fc2 backward stores it
    stored = (dg * gelu_tanh_derivative(pre, gelu_tanh_inner(pre))).to(da_ptr.dtype.element_ty)
    tl.store(da_ptr + offsets, stored, mask=mask)
    if BIAS_GRAD:  # sums dL/da as stored, as the reference sums it
        tl.store(partial_ptr + tile_m * N + cols, tl.sum(tl.where(mask, stored.to(tl.float32), 0.0), axis=0),
                 mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per GPU generation and operand table, chosen by
# reasoning, not by a sweep (no GPU has run these kernels): 128 x 128 output tiles with 8 warps (64 fp32
# accumulators a thread, room left for the GELU epilogue) are the tile Triton's own matmul tutorial and
# cuBLAS pick for M, N in the thousands; BLOCK_K 64 for bf16 (one 128-byte line a row) and 32 for
# tf32/fp32 (the same bytes). Stages: A100's 164 KB of shared memory fits 3 stages of 32 KB ((128 + 128)
# x 64 x 2 B bf16, x 32 x 4 B fp32), H100's 228 KB 4. At SiT-XL/2 (M = 8192, N = 4608) that is 64 x 36
# = 2304 tiles, 17 waves of H100's 132 SMs. A "<table>_bwd" entry, where there is one, serves the backward kernel:
# its fp32 epilogue (the a tile loaded beside the accumulator) spills 136 bytes on sm_90 under Triton 3.8
# at 128 x 128 (kernels.aot), so it takes 128 x 64 tiles.
_GPU_CONFIGS = {
    8: {"half": (128, 128, 64, 8, 3), "fp32": (128, 128, 32, 8, 3), "fp32_bwd": (128, 64, 32, 8, 3)},
    9: {"half": (128, 128, 64, 8, 4), "fp32": (128, 128, 32, 8, 4), "fp32_bwd": (128, 64, 32, 8, 4)},
}
_INTERPRET_CONFIG = (32, 32, 32)  # the CPU interpreter: small tiles so the tests' tails are many tiles
_GROUP_M = 8


def _arch(x: Tensor) -> int:
    """The compute capability's major (8: sm_80, 9: sm_90) of x's GPU; newer GPUs take sm_90's table."""
    return min(9, max(8, torch.cuda.get_device_capability(x.device)[0])) if x.is_cuda else 9


def gpu_config(arch: int, dtype: torch.dtype, kernel: str):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of `kernel` ("fwd" or "bwd") for `dtype`
    operands on a GPU of compute capability major `arch` (8 or 9)."""
    entries = _GPU_CONFIGS[arch]
    table = "half" if dtype != torch.float32 else "fp32"
    return entries.get(f"{table}_{kernel}", entries[table])


def _launch_config(x: Tensor, kernel: str, target: str, arch: int | None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, launch options) of `kernel` for operands like x launched for `target`."""
    if target == "interpret":
        return (*_INTERPRET_CONFIG, {})
    block_m, block_n, block_k, num_warps, num_stages = gpu_config(arch or _arch(x), x.dtype, kernel)
    return block_m, block_n, block_k, dict(num_warps=num_warps, num_stages=num_stages)


def _dot_meta(x: Tensor, target: str) -> dict:
    """The tiles' dot dtype and precision: bf16 tiles on a GPU; fp32 under the interpreter (which
    computes bf16 dots wrongly: the tiles are converted first) and for fp32 inputs, exact ("ieee") or
    TF32 where PyTorch's flag lets its fp32 matmuls use it (target "gpu_tf32")."""
    dot = torch.float32 if (target == "interpret" or x.dtype == torch.float32) else x.dtype
    precision = "ieee" if dot == torch.float32 and target != "gpu_tf32" else "tf32"
    return dict(DOT=tl_dtype(dot), PRECISION=precision)


def _rows(t: Tensor) -> Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _fits_int32_offsets(rows: int, *widths: int) -> bool:
    """The kernels index with 32-bit offsets: every (rows, width) operand and every weight must fit."""
    return max(rows, max(widths)) * max(widths) < 2**31


def linear_gelu_forward(x: Tensor, weight: Tensor, bias: Tensor | None, target: str | None = None,
                        arch: int | None = None) -> tuple[Tensor, Tensor]:
    """(g, a) in x's dtype and shape (last dimension weight's rows) from one launch. `target`: where the
    launch runs ("interpret", "gpu", "gpu_tf32"; by default where a launch on x runs now), `arch` its
    GPU's compute capability major (by default x's GPU's): aot_specs() asks for a GPU's launches."""
    target = target or launch_target(x)
    x2, w = _rows(x), weight if weight.stride(-1) == 1 else weight.contiguous()
    M, K = x2.shape
    N = w.shape[0]
    g = torch.empty((M, N), dtype=x.dtype, device=x.device)
    a = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, options = _launch_config(x, "fwd", target, arch)
    grid = (cdiv(M, block_m) * cdiv(N, block_n),)
    _linear_gelu_fwd_kernel[grid](
        x2, w, bias if bias is not None else w, g, a, M, N, K, x2.stride(0), w.stride(0), N,
        HAS_BIAS=bias is not None, **_dot_meta(x, target), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=_GROUP_M, **options)
    shape = (*x.shape[:-1], N)
    return g.view(shape), a.view(shape)


def linear_gelu_backward(dy: Tensor, weight: Tensor, a: Tensor, need_bias: bool, target: str | None = None,
                         arch: int | None = None) -> tuple[Tensor, Tensor | None]:
    """(dL/da in a's shape and dtype, fc1's bias gradient (N,) in fp32 or None) for dL/dy of
    y = g @ weight^T with g = GELU_tanh(a): one launch. `target`, `arch`: as linear_gelu_forward's."""
    target = target or launch_target(a)
    dy2, a2, w = _rows(dy), _rows(a), weight if weight.stride(-1) == 1 else weight.contiguous()
    M, N = a2.shape
    K = w.shape[0]
    block_m, block_n, block_k, options = _launch_config(a, "bwd", target, arch)
    da = torch.empty((M, N), dtype=a.dtype, device=a.device)
    partial = torch.empty((cdiv(M, block_m), N), dtype=torch.float32, device=a.device) if need_bias else da
    grid = (cdiv(M, block_m) * cdiv(N, block_n),)
    _linear_gelu_bwd_kernel[grid](
        dy2, w, a2, da, partial, M, N, K, dy2.stride(0), w.stride(0), a2.stride(0),
        BIAS_GRAD=need_bias, **_dot_meta(a, target), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=_GROUP_M, **options)
    return da.view(a.shape), (partial.sum(0) if need_bias else None)  # a fixed-order reduction


# ----------------------------------------------------------------------------------------------
# One autograd op for the MLP
# ----------------------------------------------------------------------------------------------

def _mlp_forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                 fc2_bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(y, a, g): the MLP's output, then fc1's output and the GELU's (saved for the backward)."""
    g, a = linear_gelu_forward(x, fc1_weight, fc1_bias)
    return F.linear(g, fc2_weight, fc2_bias), a, g


def _mlp_backward(saved, grads, needs):
    x, fc1_weight, fc2_weight, a, g = saved
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    dy = _rows(grads[0])                                                     # (M, D)
    d_w2 = dy.t() @ _rows(g) if need_w2 else None                            # (D, H)
    d_b2 = dy.sum(0) if need_b2 else None
    if not (need_x or need_w1 or need_b1):
        return [None, None, None, d_w2, d_b2]
    da, d_b1 = linear_gelu_backward(dy, fc2_weight, a, need_b1)              # (M, H), (H,)
    da = _rows(da)
    d_x = (da @ fc1_weight).view(x.shape) if need_x else None                # (..., D)
    d_w1 = da.t() @ _rows(x) if need_w1 else None                            # (H, D)
    return [d_x, d_w1, d_b1, d_w2, d_b2]


def _fake_backward(saved, grads, needs):
    x, fc1_weight, fc2_weight, a, _ = saved
    shapes = (x.shape, fc1_weight.shape, (fc1_weight.shape[0],), fc2_weight.shape, (fc2_weight.shape[0],))
    dtypes = (x.dtype, x.dtype, torch.float32, x.dtype, x.dtype)
    return [x.new_empty(shape, dtype=dtype) if need else None for shape, dtype, need in zip(shapes, dtypes, needs)]


_mlp_gelu = fused_op(
    "alignflow::mlp_gelu", forward=_mlp_forward, backward=_mlp_backward,
    save=lambda inputs, results: (inputs[0], inputs[1], inputs[3], results[1], results[2]),
    fake_forward=lambda x, w1, b1, w2, b2: (
        x.new_empty((*x.shape[:-1], w2.shape[0])), x.new_empty((*x.shape[:-1], w1.shape[0])),
        x.new_empty((*x.shape[:-1], w1.shape[0]))),
    fake_backward=_fake_backward)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def mlp_gelu(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias=None):
    """fc2(GELU_tanh(fc1(x))): x (..., D), fc1_weight (H, D), fc1_bias (H,) or None, fc2_weight (D_out, H),
    fc2_bias (D_out,) or None. All of one dtype (autocast does not reach a custom op: cast before), except
    that fc1_bias may be fp32 with bf16 operands: added rounded to bf16, as autocast's cast rounds it, its
    gradient summed and returned in fp32 (no cast and no bf16 rounding of the sum, as kernels.gelu_tanh)."""
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    H = fc1_weight.shape[0]
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"mlp_gelu: fc1_weight must be (H, {x.shape[-1]}) (x's last dimension), "
                         f"got {tuple(fc1_weight.shape)}")
    if fc2_weight.dim() != 2 or fc2_weight.shape[1] != H:
        raise ValueError(f"mlp_gelu: fc2_weight must be (D_out, {H}) (fc1's outputs), got {tuple(fc2_weight.shape)}")
    for name, bias, width in (("fc1_bias", fc1_bias, H), ("fc2_bias", fc2_bias, fc2_weight.shape[0])):
        if bias is not None and tuple(bias.shape) != (width,):
            raise ValueError(f"mlp_gelu: {name} must be ({width},), got {tuple(bias.shape)}")
    fp32_bias = fc1_bias is not None and fc1_bias.dtype == torch.float32
    dtypes = {t.dtype for t in tensors if t is not None and not (t is fc1_bias and fp32_bias)}
    if len(dtypes) > 1:
        backend = fallback("mlp_gelu", f"mixed dtypes {sorted(map(str, dtypes))}")
    elif x.numel() == 0:
        backend = fallback("mlp_gelu", "empty input")
    elif not _fits_int32_offsets(x.numel() // x.shape[-1], x.shape[-1], H, fc2_weight.shape[0]):
        backend = fallback("mlp_gelu", "more than 2^31 elements in an operand")
    else:
        backend = resolve("mlp_gelu", tensors, dtypes=SUPPORTED_DTYPES)
    if backend == "torch":
        return reference_mlp_gelu(*tensors)
    return _mlp_gelu(*tensors)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)
# ----------------------------------------------------------------------------------------------

# the tiles' dots must run on the tensor cores: mma.sync on sm_80, Hopper's warpgroup MMA on sm_90
_TENSOR_CORE_PTX = {80: ("mma.sync",), 90: ("wgmma",)}
# (hidden D, fc1 width 4 D) of the SiT models the MLP kernels are built for
_AOT_SHAPES = {"SiT-B/2": (768, 3072), "SiT-XL/2": (1152, 4608)}


def aot_specs():
    """The MLP kernels' launches of a SiT training step (batch 32 x 256 tokens; the backward with fc1's
    bias gradient), recorded from the launchers on meta tensors for sm_80's and sm_90's tables: bf16
    (bf16-mixed training) and fp32 with TF32 (an fp32 run with PyTorch's TF32 flag on, as the trainer
    sets it). Both models' shapes give the same build (every size and stride a multiple of 16), listed
    once."""
    module = sys.modules[__name__]
    specs, builds = [], set()
    for arch in (8, 9):
        for dtype, target in ((torch.bfloat16, "gpu"), (torch.float32, "gpu_tf32")):
            for D, H in _AOT_SHAPES.values():
                x = torch.empty(32, 256, D, dtype=dtype, device="meta")
                w1 = torch.empty(H, D, dtype=dtype, device="meta")
                b1 = torch.empty(H, dtype=dtype, device="meta")
                w2 = torch.empty(D, H, dtype=dtype, device="meta")
                a = torch.empty(32, 256, H, dtype=dtype, device="meta")
                with recorded_launches(module) as launches:
                    linear_gelu_forward(x, w1, b1, target, arch)
                    linear_gelu_backward(torch.empty_like(x), w2, a, True, target, arch)
                for launch in launches:
                    kernel = launch.fn.__name__.removeprefix("_").removesuffix("_kernel")
                    spec = launch_spec(f"{kernel}[{TRITON_TYPES[dtype]}, sm_{arch}0 table]", launch,
                                       require_ptx=_TENSOR_CORE_PTX)
                    build = repr((spec.fn, spec.signature, spec.constexprs, spec.num_warps, spec.num_stages,
                                  spec.not_divisible))
                    if build not in builds:
                        builds.add(build)
                        specs.append(spec)
    return specs
