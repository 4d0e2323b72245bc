"""A Linear with the GELU (tanh approximation) in its matmul's epilogue, for SiT's MLP.

    linear_gelu_forward(x, W, bias) -> (g, a)     a = x @ W^T + bias,  g = GELU_tanh(a)

One Triton matmul (fp32 accumulation) writes both the GELU output g (fc2's input) and its input a
(what the GELU backward reads), so the separate GELU pass (read a, write g) is gone. bf16 and fp32
inputs; other dtypes run the reference. The GELU math is kernels.gelu's (gelu_tanh_inner/derivative),
and g is computed from a as stored (rounded to a's dtype), as torch's F.gelu computes it from fc1's
output, so g's numerics are torch's given a.

Opt-in (SiT's `model.mlp_kernel: triton`): a new matmul kernel of ours becomes the default only after a
GPU measurement shows it at least as fast as cuBLAS at SiT's shapes; none has been made.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._util import TRITON_TYPES, launch_spec, recorded_launches, tl_dtype
from .attention import launch_target
from .gelu import gelu_tanh_inner

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------

def reference_linear_gelu(x, weight, bias=None):
    """(g, a): a = F.linear(x, weight, bias), g = F.gelu(a, approximate="tanh")."""
    a = F.linear(x, weight, bias)
    return F.gelu(a, approximate="tanh"), a


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
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    a = acc.to(a_ptr.dtype.element_ty)
    pre = a.to(tl.float32)  # GELU of a as stored, as F.gelu reads fc1's output
    g = 0.5 * pre * (1.0 + gelu_tanh_inner(pre))
    offsets = rows[:, None] * stride_out_row + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(a_ptr + offsets, a, mask=mask)
    tl.store(g_ptr + offsets, g.to(g_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per GPU generation and operand table, chosen by
# reasoning, not by a sweep (no GPU has run these kernels): 128 x 128 output tiles with 8 warps (64 fp32
# accumulators a thread, room left for the GELU epilogue) are the tile Triton's own matmul tutorial and
# cuBLAS pick for M, N in the thousands; BLOCK_K 64 for bf16 (one 128-byte line a row) and 32 for
# tf32/fp32 (the same bytes). Stages: A100's 164 KB of shared memory fits 3 stages of 32 KB ((128 + 128)
# x 64 x 2 B bf16, x 32 x 4 B fp32), H100's 228 KB 4. At SiT-XL/2 (M = 8192, N = 4608) that is 64 x 36 = 2304 tiles,
# 17 waves of H100's 132 SMs.
_GPU_CONFIGS = {
    8: {"half": (128, 128, 64, 8, 3), "fp32": (128, 128, 32, 8, 3)},
    9: {"half": (128, 128, 64, 8, 4), "fp32": (128, 128, 32, 8, 4)},
}
_INTERPRET_CONFIG = (32, 32, 32)  # the CPU interpreter: small tiles so the tests' tails are many tiles
_GROUP_M = 8


def _arch(x: Tensor) -> int:
    """The compute capability's major (8: sm_80, 9: sm_90) of x's GPU; newer GPUs take sm_90's table."""
    return min(9, max(8, torch.cuda.get_device_capability(x.device)[0])) if x.is_cuda else 9


def _launch_config(x: Tensor, target: str, arch: int | None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, launch options) for operands like x launched for `target`."""
    if target == "interpret":
        return (*_INTERPRET_CONFIG, {})
    table = "half" if x.dtype != torch.float32 else "fp32"
    block_m, block_n, block_k, num_warps, num_stages = _GPU_CONFIGS[arch or _arch(x)][table]
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


def fits_int32_offsets(*tensors: Tensor) -> bool:
    """The kernels index with 32-bit offsets: every operand's elements must be addressable so."""
    return all(t.numel() < 2**31 for t in tensors if t is not None)


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
    block_m, block_n, block_k, options = _launch_config(x, target, arch)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _linear_gelu_fwd_kernel[grid](
        x2, w, bias if bias is not None else w, g, a, M, N, K, x2.stride(0), w.stride(0), N,
        HAS_BIAS=bias is not None, **_dot_meta(x, target), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=_GROUP_M, **options)
    shape = (*x.shape[:-1], N)
    return g.view(shape), a.view(shape)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)
# ----------------------------------------------------------------------------------------------

# the tiles' dots must run on the tensor cores: mma.sync on sm_80, Hopper's warpgroup MMA on sm_90
_TENSOR_CORE_PTX = {80: ("mma.sync",), 90: ("wgmma",)}
# (hidden D, fc1 width 4 D) of the SiT models the MLP kernels are built for
_AOT_SHAPES = {"SiT-B/2": (768, 3072), "SiT-XL/2": (1152, 4608)}


def aot_specs():
    """The MLP kernels' launches of a SiT training step (batch 32 x 256 tokens), recorded from the
    launchers on meta tensors for sm_80's and sm_90's tables: bf16 (bf16-mixed training) and fp32 with
    TF32 (an fp32 run with PyTorch's TF32 flag on, as the trainer sets it). Both models' shapes give the
    same build (every size and stride a multiple of 16), listed once."""
    module = sys.modules[__name__]
    specs, builds = [], set()
    for arch in (8, 9):
        for dtype, target in ((torch.bfloat16, "gpu"), (torch.float32, "gpu_tf32")):
            for D, H in _AOT_SHAPES.values():
                x = torch.empty(32, 256, D, dtype=dtype, device="meta")
                w1 = torch.empty(H, D, dtype=dtype, device="meta")
                b1 = torch.empty(H, dtype=dtype, device="meta")
                with recorded_launches(module) as launches:
                    linear_gelu_forward(x, w1, b1, target, arch)
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
