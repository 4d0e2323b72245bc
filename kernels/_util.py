"""Small helpers shared by the kernel modules: compute dtypes, block sizes, AOT specs, poisoning."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64 (so fp64 tests check the math, not fp32 rounding), else fp32."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def tl_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def reduce_per_sample(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """A (B,) per-sample loss reduced as `reduction` ("mean", "sum" or "none") says."""
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@dataclass(frozen=True)
class AotSpec:
    """One Triton kernel instance to compile ahead of time (see `python -m kernels.aot`).

    `signature` maps every non-constexpr argument to its Triton type ("*bf16", "*fp32", "i32", ...);
    `constexprs` gives the compile-time values; `num_warps`/`num_stages` the launch configuration;
    `require_ptx` maps an arch to texts its PTX must contain (e.g. {90: ("wgmma",)}).

    The build is specialised as Triton's JIT specialises a launch at the real SiT shapes: every pointer
    16-byte aligned and every integer argument a multiple of 16 (widths 768/1152, strides, N = 256),
    except those named in `not_divisible`. `min_load_bits` asks for global loads at least that wide
    (128: 16-byte vector loads, what a memory-bound kernel needs to approach the copy bandwidth).
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    require_ptx: dict = field(default_factory=dict)
    not_divisible: tuple = ()
    min_load_bits: int = 0
