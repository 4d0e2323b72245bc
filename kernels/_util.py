"""Small helpers shared by the kernel modules: compute dtypes, block sizes, AOT specs, poisoning."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
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


# Host-side launch arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions, whose wrapper (unwrapping each argument) made them a third of an eager adaLN call's host
# time on the CPU (bench.host).

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


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
    Specs are not typed by hand where it can be helped: `launch_spec` derives one from a launch that
    the op's own launcher made (see `recorded_launches`).
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


# ----------------------------------------------------------------------------------------------
# AOT specs from the launchers' own launches
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """One `kernel[grid](*args, **kwargs)` call, as a launcher made it."""

    fn: object
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.fn, grid, args, kwargs))


@contextlib.contextmanager
def recorded_launches(module):
    """Every Triton launch the launchers of kernel module `module` make inside, recorded (in order)
    instead of run. The launchers run on meta tensors at the real shapes, so the recorded arguments
    are what the JIT call receives there: `launch_spec` turns each into the AOT build of that call."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from ._backend import use_backend

    launches: list[Launch] = []
    kernels = {name: fn for name, fn in vars(module).items()
               if name.endswith("_kernel") and isinstance(fn, (JITFunction, InterpretedFunction))}
    for name, fn in kernels.items():
        setattr(module, name, _Recorder(fn, launches))
    try:
        with use_backend("triton"):  # not the CUDA C++ kernels, whatever backend the caller set
            yield launches
    finally:
        for name, fn in kernels.items():
            setattr(module, name, fn)


TRITON_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _constexpr_names(fn) -> set:
    if hasattr(fn, "params"):  # JITFunction
        return {p.name for p in fn.params if p.is_constexpr}
    annotations = inspect.signature(fn.fn).parameters  # InterpretedFunction (TRITON_INTERPRET=1)
    return {name for name, p in annotations.items()
            if p.annotation is tl.constexpr or str(p.annotation).endswith("constexpr")}


def launch_spec(name: str, launch: Launch, **options) -> AotSpec:
    """The AOT build of one recorded launch, typed as Triton's JIT types it: a tensor is a pointer to
    its dtype (without the 16-byte alignment hint where its data_ptr is off 16 bytes: a meta tensor's
    is its byte offset), an int an i32 (i64 beyond int32; an int equal to 1, like a unit stride, a
    constant, as the JIT specialises it; one not a multiple of 16 loses the divisibility hint), a float
    an fp32, a bool an i1; constexprs and num_warps/num_stages as passed. `options`: the other AotSpec
    fields (require_ptx, min_load_bits). Refuses a launch that does not bind every kernel argument once."""
    fn = launch.fn
    names = list(fn.arg_names)
    options = dict(options)
    for key in _LAUNCH_OPTIONS:
        if key in launch.kwargs:
            options.setdefault(key, launch.kwargs[key])
    given = dict(zip(names, launch.args))
    keywords = {k: v for k, v in launch.kwargs.items() if k not in _LAUNCH_OPTIONS}
    twice = sorted(set(given) & set(keywords))
    unknown = sorted(set(keywords) - set(names))
    given.update(keywords)
    missing = [n for n in names if n not in given]
    if len(launch.args) > len(names) or twice or unknown or missing:
        raise ValueError(f"{name}: the launch does not match {fn.__name__}'s arguments ({len(launch.args)} "
                         f"positional for {len(names)}; twice: {twice}, unknown: {unknown}, missing: {missing})")
    constexpr_names = _constexpr_names(fn)
    signature, constexprs, not_divisible = {}, {}, []
    for arg in names:
        value = given[arg]
        if arg in constexpr_names or value is None:
            constexprs[arg] = value
        elif isinstance(value, torch.Tensor):
            signature[arg] = f"*{TRITON_TYPES[value.dtype]}"
            if value.data_ptr() % 16:
                not_divisible.append(arg)
        elif isinstance(value, bool):
            signature[arg] = "i1"
        elif isinstance(value, int):
            if value == 1:
                constexprs[arg] = 1
                continue
            signature[arg] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16:
                not_divisible.append(arg)
        elif isinstance(value, float):
            signature[arg] = "fp32"
        else:
            raise ValueError(f"{name}: {fn.__name__} argument {arg}={value!r}: no Triton type for "
                             f"{type(value).__name__}")
    return AotSpec(name, fn, signature, constexprs, not_divisible=tuple(not_divisible), **options)
