"""Training-step cost model (modelled, not measured): the bytes, FLOPs and launches of one whole
training step, counted on fake tensors on the CPU, turned into a modelled time on named GPUs.

    python -m bench.model [--model SiT-XL/2] [--batch 32] [--resolution 256] [--encoder dinov2-vit-b]
                          [--reg] [--car-flow none] [--precision bf16-mixed|bf16] [--variants ...]
                          [--device-preset h100-sxm] [--zero-gpus 8,64] [--out bench/results]
    python -m bench.model --write-baseline     # the regression guard's baseline (see tests/test_bench_model.py)
    python -m bench.model --fit-host           # refit HOST_COSTS to the newest measured step in --results

The step is `bench.train_step.one_step` itself (its `build` too), run once to create the optimizer
state and once more recorded, under FakeTensorMode: no tensor has data, every aten op is recorded by a
TorchDispatchMode with its input and output shapes and dtypes, and every Triton kernel launch of the
fused ops is intercepted (the launchers run as they do on a GPU, allocating their outputs and scratch
buffers on fake tensors, and launch nothing). Per op:
  - bytes: each kernel reads each distinct input tensor and writes each output once (a lower bound:
    re-reads from L2 or HBM inside a kernel are not counted); a Triton launch touches each distinct
    tensor argument once (its scratch buffers included, since the launcher allocates them);
  - FLOPs: matmuls and convolutions (2 per multiply-add) and attention as executed: FlashAttention-2
    (PyTorch's flash SDPA backend) pads head dim 72 to its 96 kernel and recomputes S and P in a
    five-GEMM backward; our Triton kernel tiles 72 as 64 + 16 (kernels.attention.head_tiles), pads N
    to its blocks and runs 2 GEMMs forward, 4 (dK, dV) + 3 (dQ) backward. Everything else is counted as
    memory-bound (no FLOPs);
  - launches: 1 per kernel; views and allocations launch nothing; multi-tensor (foreach, fused AdamW)
    ops launch as CUDA's multi_tensor_apply chunks them.
Compiled variants run the same trace, then model Inductor's fusion explicitly: inside the compiled
module (SiT's forward and its backward, and the fused encoder's forward; the reference encoder, losses
and optimizer stay eager, as in bench.train_step), each maximal run of pointwise/reduction/copy ops between anchors (matmuls,
convolutions, attention, Triton kernels) becomes one kernel that reads the tensors it takes from
outside the run and writes the tensors read after it.
Time per op = max(FLOPs / (matmul peak x efficiency), bytes / bandwidth) + launches x launch cost: the
device lane. The host lane counts the calls the host makes in each phase of bench.train_step's breakdown
(HOST_KINDS: aten ops dispatched eagerly, our `kernels` ops' eager calls, autograd nodes, DeepSpeed's
per-parameter hooks, multi-tensor calls; in compiled regions Inductor's launch per kernel, or one CUDA-graph
replay) at a cost per kind (HOST_COSTS, fitted to a measured step: fit_host_costs, `--fit-host`); each phase
takes the longer of the two lanes (compose_phases), the step their sum.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import sys
import warnings
from collections import defaultdict
import dataclasses
from dataclasses import dataclass, field

import torch

from bench.common import model_payloads, newest
# TRAINER_VARIANTS: name -> (precision, compile); TRAINER_ZERO_STAGES: those at another stage than 2
from bench.train_step import (ADAMW_KERNEL_VARIANTS, BF16_COPIES_VARIANTS, BF16_GRADS_VARIANTS, FUSED_CLIP_VARIANTS,
                              SWITCH_OFF_VARIANTS, TRAINER_VARIANTS, TRAINER_ZERO_STAGES, VARIANTS as BENCH_VARIANTS,
                              add_step_arguments)

CATEGORIES = ("matmul", "attention", "norm/modulate", "pointwise", "casts/copies", "reductions", "optimizer",
              "encoder", "losses")
STEP_VARIANTS = ("reference-eager", "reference-compiled", "alignflow", "alignflow-separate-clip",
                 "alignflow-bf16-copies", "alignflow-adamw-kernel", "alignflow-compiled", "alignflow-graphs",
                 "alignflow-graphs-all", "alignflow-graphs-all-fp32-grads")
# bench.train_step's variants that time engine.trainer.Trainer's own step (DeepSpeed ZeRO-2, one GPU), as
# modelled here: bench.train_step's step with the fused kernels (the trainer's "auto" backend on a GPU),
# the given train.precision, DeepSpeed ZeRO-2's gradient reduction and step as DeepSpeed runs them
# (_ZeroOptimizer, checked op for op against DeepSpeed by tests/test_bench_model_deepspeed.py) and the
# trainer's EMA update; the trainer's finite-loss check and gradient-norm read (host syncs) cost nothing here.
# Those at another ZeRO stage (TRAINER_ZERO_STAGES): stage 0 (trainer-bf16-mixed-zero0) as DeepSpeed's engine
# without ZeRO runs it (_StageZeroEngine, checked the same way); the others are measured only.
MODELLED_ZERO_STAGES = (0, 2)
VARIANTS = STEP_VARIANTS + tuple(name for name in TRAINER_VARIANTS
                                 if TRAINER_ZERO_STAGES.get(name, 2) in MODELLED_ZERO_STAGES)
# variants modelled only when --variants names them (not in the baseline or the README tables):
# name -> (the variant it changes, model config overrides). alignflow-mlp-triton: alignflow with
# model.mlp_kernel: triton (kernels.mlp_gelu's Triton matmuls, not measured on a GPU); alignflow-graphs-all-mlp-triton:
# alignflow-graphs-all with it (the most the model sees with every kernel of ours on); and bench.train_step's
# SWITCH_OFF_VARIANTS, alignflow with one SiT switch off (bench.predict models those it finds measured)
OPT_IN_VARIANTS = {"alignflow-mlp-triton": ("alignflow", {"mlp_kernel": "triton"}),
                   "alignflow-graphs-all-mlp-triton": ("alignflow-graphs-all", {"mlp_kernel": "triton"}),
                   **{name: ("alignflow", overrides) for name, overrides in SWITCH_OFF_VARIANTS.items()}}
PRECISIONS = ("bf16-mixed", "bf16")


# ----------------------------------------------------------------------------------------------
# Device presets (datasheet numbers: dense, no structured sparsity)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    name: str
    bf16_flop_per_s: float      # dense bf16 tensor-core peak
    tf32_flop_per_s: float      # dense TF32 tensor-core peak (fp32 matmuls with TF32 on, the trainer's default)
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float   # per GPU, both directions together
    source: str
    match: tuple = ()           # substrings of torch.cuda.get_device_name() that a measured result must have


PRESETS = {
    "h100-sxm": Device("H100 SXM", 989.4e12, 494.7e12, 3.35e12, 900e9,
                       "NVIDIA H100 Tensor Core GPU datasheet (SXM5: BF16 1979 TFLOPS with sparsity, "
                       "TF32 989 with sparsity, HBM3 3.35 TB/s, NVLink 900 GB/s)", ("H100",)),
    "h200": Device("H200 SXM", 989.4e12, 494.7e12, 4.8e12, 900e9,
                   "NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 1979 TFLOPS with sparsity, HBM3e 4.8 TB/s, "
                   "NVLink 900 GB/s)", ("H200",)),
    "a100-80gb": Device("A100 80GB SXM", 312e12, 156e12, 2.039e12, 600e9,
                        "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: BF16 312 TFLOPS, TF32 156, HBM2e "
                        "2039 GB/s, NVLink 600 GB/s)", ("A100",)),
    "b200": Device("B200", 2.25e15, 1.1e15, 8.0e12, 1.8e12,
                   "NVIDIA HGX B200 datasheet (per GPU: FP16/BF16 4.5 PFLOPS and TF32 2.2 PFLOPS with sparsity, "
                   "HBM3e 8 TB/s, NVLink 5 1.8 TB/s)", ("B200",)),
}


def preset_for(device_name: str) -> str | None:
    """The preset a measured device is (its `match` substrings in the CUDA device name), or None for a
    device without one."""
    found = [name for name, device in PRESETS.items() if device.match and all(m in device_name for m in device.match)]
    return found[0] if len(found) == 1 else None


# Fractions of the datasheet peaks that the model assumes a kernel reaches (printed with every result).
MATMUL_EFFICIENCY = 0.75      # large bf16 GEMMs on H100 reach ~700-750 of 989 TFLOP/s
ATTENTION_EFFICIENCY = 0.45   # FlashAttention-2 class kernels: ~350-450 TFLOP/s forward on an H100
BANDWIDTH_EFFICIENCY = 0.9    # a device-to-device copy reaches ~90% of the HBM datasheet figure
LAUNCH_S = 3e-6               # per kernel launch (gap between back-to-back kernels)
GRAPH_NODE_S = 1e-6           # per kernel inside a replayed CUDA graph (the device-side gap between its nodes)
IB_BYTES_PER_S = 50e9         # 400 Gb/s InfiniBand per GPU, each direction
GPUS_PER_NODE = 8


def device_ceilings(preset: str, results_dir: str = "bench/results") -> dict:
    """The bandwidth and bf16 matmul ceilings the model uses for `preset`: the datasheet figures times
    the efficiencies above, replaced by the copy bandwidth and bf16 matmul rate that a GPU run of this
    device recorded in `results_dir` (bench/common.py measures them; kernels-*.json "ceilings", or
    train_step-*.json "matmul_flop_per_s"), where one has."""
    device = PRESETS[preset]
    out = {"device": device.name, "source": device.source,
           "bandwidth": device.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY,
           "bandwidth_from": f"datasheet {device.hbm_bytes_per_s / 1e12:.2f} TB/s x {BANDWIDTH_EFFICIENCY}",
           "bf16": device.bf16_flop_per_s * MATMUL_EFFICIENCY,
           "bf16_from": f"datasheet {device.bf16_flop_per_s / 1e12:.0f} TFLOP/s x {MATMUL_EFFICIENCY}",
           "tf32": device.tf32_flop_per_s * MATMUL_EFFICIENCY, "peak_bf16": device.bf16_flop_per_s,
           "attention_efficiency": ATTENTION_EFFICIENCY / MATMUL_EFFICIENCY}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, ValueError):
            continue
        name = (payload.get("environment") or {}).get("device", "") if isinstance(payload, dict) else ""
        if not device.match or not all(m in name for m in device.match):
            continue
        ceilings = payload.get("ceilings") or {}
        if ceilings.get("copy_bytes_per_s"):
            out["bandwidth"] = ceilings["copy_bytes_per_s"]
            out["bandwidth_from"] = f"measured copy bandwidth, {os.path.basename(path)}"
        matmul = ceilings.get("matmul_flop_per_s") or payload.get("matmul_flop_per_s")
        if matmul:
            out["bf16"] = matmul
            out["tf32"] = matmul * device.tf32_flop_per_s / device.bf16_flop_per_s
            out["bf16_from"] = f"measured bf16 matmul rate, {os.path.basename(path)}"
    return out


# ----------------------------------------------------------------------------------------------
# Counting one op
# ----------------------------------------------------------------------------------------------

@dataclass
class Op:
    name: str                # aten op ("mm"), or "triton:<kernel>" for a fused kernel's launch
    phase: str               # encoder / forward / loss / backward / optimizer
    category: str
    flops: float = 0.0       # executed (padding and recompute included)
    model_flops: float = 0.0 # the useful part (what analytic counts count)
    read: float = 0.0        # bytes
    written: float = 0.0
    launches: int = 0
    matmul_dtype: str = ""   # "bf16" / "fp32" for ops with FLOPs
    compiled: bool = False   # inside the torch.compile'd module (SiT forward or backward)
    fused_region: bool = False  # inside a `kernels` op (the fused kernel, or the reference path it replaces)
    anchor: bool = False     # not fused by Inductor (matmul, attention, Triton kernel, multi-tensor op)
    graph: bool = False      # replayed from a CUDA graph (torch.compile mode="reduce-overhead"): GRAPH_NODE_S a launch
    graph_start: bool = False  # the first kernel of a graph: the graph's own launch (LAUNCH_S) on top
    shapes: str = ""
    step_phase: str = ""     # the part of bench.train_step's breakdown it falls in: encoder/forward/backward/optimizer
    reads: list = field(default_factory=list, repr=False)    # [(storage key, bytes)]
    writes: list = field(default_factory=list, repr=False)

    @property
    def bytes(self) -> float:
        return self.read + self.written


@dataclass
class HostCall:
    """One call the host makes in the step, for the host lane (see HOST_KINDS): what kind of call, the
    part of bench.train_step's breakdown it falls in, and whether it is inside a compiled region (SiT's
    forward and backward, the fused encoder's forward), where the compiled variants replace it."""
    kind: str
    step_phase: str
    compiled: bool = False
    name: str = ""


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


def _footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view covers (a broadcast dimension with stride 0 once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "_convolution"}
_SDPA = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
_SDPA_BACKWARD = {n + "_backward" for n in _SDPA}
_NORMS = {"native_layer_norm", "native_layer_norm_backward", "native_group_norm", "native_group_norm_backward"}
_COPIES = {"_to_copy", "copy_", "clone", "cat", "stack", "contiguous", "index_select",
           "embedding", "embedding_dense_backward", "upsample_bicubic2d", "constant_pad_nd", "repeat"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "linalg_vector_norm", "norm", "var_mean", "var",
               "std", "_foreach_norm", "prod", "cumsum", "logsumexp", "_softmax", "_log_softmax"}
_WRITE_ONLY = {"fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
               "new_zeros", "new_ones", "new_full", "rand", "randn", "rand_like", "randn_like", "randint",
               "randint_like", "normal_", "uniform_", "bernoulli_", "exponential_", "random_", "arange",
               "scalar_tensor", "linspace"}
_FREE = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "_local_scalar_dense",
         "lift_fresh", "lift_fresh_copy", "detach", "alias", "set_", "resize_", "_record_function_enter_new",
         "_record_function_exit", "device", "is_same_size", "sym_size", "sym_stride", "sym_numel",
         "sym_storage_offset", "_has_compatible_shallow_copy_type", "record_stream", "_assert_async",
         "_to_copy_meta",
         "_unsafe_view"}  # a view that autograd does not track as one (matmul's fold of mm's output): no copy
# dispatched on fake tensors but attribute reads or bookkeeping on a CUDA tensor: no host call of their own
# (detach: autograd's own, of the tensors it saves and accumulates)
_NO_HOST_CALL = {"detach", "device", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "promote_types",
                 "_has_compatible_shallow_copy_type", "_record_function_enter_new", "_record_function_exit",
                 "is_same_size", "_to_copy_meta", "_local_scalar_dense"}
_ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
_FA2_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)   # FlashAttention-2's kernel instantiations


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _same_view(a, b) -> bool:
    """Whether two tensors are the same view of the same storage (copy_ between them moves nothing)."""
    return (isinstance(b, torch.Tensor) and _storage_key(a) == _storage_key(b) and a.dtype == b.dtype
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def _is_view(func) -> bool:
    schema = func._schema
    return bool(schema.returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                        for r in schema.returns)


def _mutated_args(func, args, kwargs):
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(a.name)
            out.extend(_tensors(value))
    return out


def _multi_tensor_launches(lists) -> int:
    """Launches of CUDA's multi_tensor_apply over `lists` (one list per operand): 65536-element chunks,
    at most 320 blocks and depth_to_max_tensors[depth] tensors per launch."""
    depth = max(1, len(lists))
    max_tensors = (110, 64, 48, 36, 30)[min(depth, 5) - 1]
    first = lists[0] if lists else []
    chunks = sum(-(-t.numel() // 65536) for t in first)
    return max(1, -(-len(first) // max_tensors), -(-chunks // 320)) if first else 0


def _matmul_flops(name, args, out) -> float:
    if name == "mm":
        (m, k), n = args[0].shape, args[1].shape[1]
        return 2.0 * m * k * n
    if name == "addmm":
        (m, k), n = args[1].shape, args[2].shape[1]
        return 2.0 * m * k * n
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name in ("convolution", "_convolution"):
        weight, groups = args[1], args[8]
        return 2.0 * out.numel() * weight.shape[1] * math.prod(weight.shape[2:]) if groups else 0.0
    if name == "convolution_backward":
        grad_out, weight, mask = args[0], args[2], args[-1]
        per = 2.0 * grad_out.numel() * weight.shape[1] * math.prod(weight.shape[2:])
        return per * (int(mask[0]) + int(mask[1]))
    return 0.0


def _flash_flops(q, k, backward: bool) -> tuple[float, float]:
    """(executed, useful) FLOPs of PyTorch's flash SDPA (FlashAttention-2) for q (B, H, N, d)."""
    B, H, N, d = q.shape
    Nk = k.shape[2]
    useful = 4.0 * B * H * N * Nk * d
    d_pad = next(x for x in _FA2_HEAD_DIMS if x >= d) if d <= 256 else d
    executed = 4.0 * B * H * _round_up(N, 128) * _round_up(Nk, 128) * d_pad
    return (2.5 * executed, 2.0 * useful) if backward else (executed, useful)


# name -> (GEMMs per (query block, key block) pair, useful GEMMs, launch table key)
_TRITON_ATTENTION = {"_attn_fwd_kernel": (2, 2, "fwd"), "_attn_bwd_dkdv_kernel": (4, 3, "dkdv"),
                     "_attn_bwd_dq_kernel": (3, 1, "dq")}


def _triton_attention_flops(kernel: str, q: torch.Tensor, qk_norm: bool) -> tuple[float, float]:
    """(executed, useful) FLOPs of one of our Triton attention launches (q is (B, H, N, d)). The head
    dim is tiled as kernels.attention.head_tiles says (72 -> 64 + 16) and N padded to the launch's GPU
    blocks. Useful: the forward's 2 GEMMs, the backward's 4 without recompute (split 3 + 1)."""
    import importlib

    attn = importlib.import_module("kernels.attention")  # the module (the package's `attention` is the op)
    B, H, N, d = q.shape
    gemms, useful_gemms, key = _TRITON_ATTENTION[kernel]
    d0, d1 = attn.head_tiles(d)
    table = attn._config_table(q.dtype != torch.float32, "tf32" if q.dtype == torch.float32 else "ieee")
    block_m, block_n = attn._gpu_config(key, table, qk_norm)[:2]
    executed = 2.0 * gemms * B * H * _round_up(N, block_m) * _round_up(N, block_n) * (d0 + d1)
    return executed, 2.0 * useful_gemms * B * H * N * N * d


_TRITON_MATMULS = {"_linear_gelu_fwd_kernel": "fwd", "_linear_gelu_bwd_kernel": "bwd"}


def _triton_matmul_flops(kernel: str, args: tuple) -> tuple[float, float]:
    """(executed, useful) FLOPs of one of our Triton matmul launches (kernels.linear_gelu: the MLP's fc1
    with the GELU epilogue, fc2's dL/dg with GELU'): 2 M N K, M, N and K padded to the GPU tiles that
    kernels.linear_gelu.gpu_config gives an H100 (the trace itself runs the interpreter's)."""
    import importlib

    linear_gelu = importlib.import_module("kernels.linear_gelu")
    M, N, K = args[5:8]  # both kernels: (5 pointers, M, N, K, ...)
    dtype = next(_tensors(args)).dtype
    block_m, block_n, block_k = linear_gelu.gpu_config(9, dtype, _TRITON_MATMULS[kernel])[:3]
    executed = 2.0 * _round_up(M, block_m) * _round_up(N, block_n) * _round_up(K, block_k)
    return executed, 2.0 * M * N * K


def op_category(name: str, phase: str, stack_category: str | None) -> str:
    if phase in ("encoder", "optimizer"):
        return phase
    if phase == "loss":
        return "losses"
    if stack_category:
        return stack_category
    if name in _MATMULS:
        return "matmul"
    if name in _SDPA or name in _SDPA_BACKWARD:
        return "attention"
    if name in _NORMS:
        return "norm/modulate"
    if name in _COPIES:
        return "casts/copies"
    if name in _REDUCTIONS:
        return "reductions"
    return "pointwise"


# ----------------------------------------------------------------------------------------------
# The tracer
# ----------------------------------------------------------------------------------------------

_KERNEL_MODULES = {"adaln.py": "norm/modulate", "attention.py": "attention", "interpolant.py": "losses",
                   "alignment_loss.py": "losses", "gelu.py": "pointwise", "linear_gelu.py": "matmul"}
_KERNELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")


def _stack_context():
    """(category, inside a kernels op) from the innermost frame in a kernels/ op module. A frame of
    kernels/_autograd.py (the one registration, which autograd calls directly) counts as the op module
    whose forward/backward it runs, so the casts it adds are attributed as when each op module had its own
    autograd.Function."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_KERNELS_DIR):
            name = os.path.basename(path)
            if name == "_autograd.py":
                run = frame.f_locals.get("backward") or frame.f_locals.get("forward")
                name = os.path.basename(getattr(getattr(run, "__code__", None), "co_filename", ""))
            category = _KERNEL_MODULES.get(name)
            if category:
                return category, True
        frame = frame.f_back
    return None, False


class Tracer(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op and every Triton launch run under it as an `Op`. Set `phase` from outside;
    `in_model` marks the ops of the compiled module's forward. Backward ops take the phase ("loss" or
    model) and the kernels category of the forward op whose autograd node runs them."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.phase = "forward"
        self.in_model = False
        self.encoder_compiled = False  # the encoder's ops belong to a compiled region in compiled variants
        self.recording = True
        # every storage seen, alive to the end: storage keys are addresses, never to be reused. The storages,
        # not the tensors: a tensor kept alive would stop AccumulateGrad from stealing a gradient (a copy)
        self._keep: list = []
        self._fresh: set = set()  # storages allocated (torch.empty) and not written yet: a launch's outputs
        self._forward_outputs: list = []
        self._opaque = 0  # > 0 inside a registered custom op's implementation (see _run_launcher)
        self._attributed = None  # a phase: the ops of the ZeRO optimizer's stand-in (category optimizer)
        self.host: list[HostCall] = []  # the host lane's calls (count_host)
        self._nodes: dict = {}  # id -> autograd node, each counted once (kept alive: ids are addresses)
        self._graph_roots: list = []  # (tensor, in_model): the outputs of eager `kernels` op calls

    @contextlib.contextmanager
    def attributed(self, phase: str):
        """Ops run inside are the optimizer's (category "optimizer"), in `phase`: "backward" for the
        ZeRO reduction's work on the whole gradient, "optimizer" for the work on the rank's partition."""
        saved, self._attributed = self._attributed, phase
        try:
            yield
        finally:
            self._attributed = saved

    # -- Triton launches -------------------------------------------------------------------------
    @contextlib.contextmanager
    def intercept_triton(self):
        """Triton launches recorded instead of run; each eager call of a `kernels` op (its FusedOp) counted
        for the host lane."""
        from triton.runtime.jit import KernelInterface

        from kernels._autograd import FusedOp

        original, original_call = KernelInterface.__getitem__, FusedOp.__call__
        tracer = self

        def getitem(kernel, grid):
            def launch(*args, **kwargs):
                tracer.record_triton(kernel, args, kwargs)
            return launch

        def call(op, *inputs):
            if tracer.recording and not torch.compiler.is_compiling():
                tracer.host_call("kernels_op", tracer._compiled_op(tracer._phase(None)), op.name)
            out = original_call(op, *inputs)
            if tracer.recording and tracer.phase == "forward":  # its backward node: a root of the graph walk
                tracer._graph_roots.extend((t, tracer.in_model) for t in _tensors(out))
            return out

        KernelInterface.__getitem__, FusedOp.__call__ = getitem, call
        try:
            yield
        finally:
            KernelInterface.__getitem__, FusedOp.__call__ = original, original_call

    @contextlib.contextmanager
    def intercept_cuda_adamw(self):
        """kernels.adamw_step's CUDA C++ launch (csrc/adamw.cu, ClippedAdamW's optim.step_kernel alignflow)
        recorded instead of run: one op reading every param, gradient, moment and the divisor, writing the
        params, moments and bf16 copies (the gradients only read); one launch, a second where some chunk
        cannot take 128-bit loads (a size off the vector width or a view off 16 bytes, as csrc/adamw.cu
        sorts them; storages taken as aligned); its chunk tables cached (no copy: the steady
        state). Its host call is a multi-tensor one; the launcher's Python (checks, table lookup) measured
        0.8-1.6 ms a call over SiT-XL/2's 298 tensors on the 2-core CI CPU with the launch stubbed."""
        from engine.optim import ClippedAdamW
        from kernels import _cuda

        tracer = self
        original = _cuda.supports_adamw, _cuda.adamw_step

        def launch(params, grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay, grad_scale,
                   params_bf16):
            if not tracer.recording:
                return
            vec = 4 if grads[0].dtype == torch.float32 else 8  # alignflow_adamw_vec
            read = [*params, *grads, *exp_avgs, *exp_avg_sqs] + ([grad_scale] if grad_scale is not None else [])
            written = [*params, *exp_avgs, *exp_avg_sqs, *(params_bf16 or [])]
            for t in read + written:
                tracer._keep.append(t.untyped_storage())
            reads = [(_storage_key(t), _footprint(t)) for t in read]
            writes = [(_storage_key(t), _footprint(t)) for t in written]
            chunk = 4096  # csrc/adamw.cu's kChunk
            ragged = any((row[0].numel() % chunk or chunk) % vec  # a last chunk off the vector width, or a view
                         or any(t.storage_offset() * t.element_size() % 16 for t in row if t is not None)  # off 16 B
                         for row in zip(params, grads, exp_avgs, exp_avg_sqs, params_bf16 or [None] * len(params)))
            op = Op("cuda:adamw_step", tracer.phase, "optimizer", read=sum(b for _, b in reads),
                    written=sum(b for _, b in writes), launches=1 + ragged, anchor=True, reads=reads, writes=writes)
            op.step_phase = tracer.phase
            tracer.ops.append(op)
            tracer.host_call("multi_tensor", False, "cuda:adamw_step")

        def foreach_add(tensors, other, **kwargs):  # ClippedAdamW's step counts += isfinite(divisor): a device
            if isinstance(other, torch.Tensor):      # scalar on CUDA; on CPU the binding would .item() it
                return torch.ops.aten._foreach_add_.Tensor(tensors, other, **kwargs)
            return original_add(tensors, other, **kwargs)

        # ClippedAdamW reads back, at its next step, whether the last one was taken: a fake flag has no
        # value, so the traced steps count as taken
        original_add, original_resolve = torch._foreach_add_, ClippedAdamW._resolve_pending_finite
        _cuda.supports_adamw, _cuda.adamw_step, torch._foreach_add_ = (lambda *args: True), launch, foreach_add
        ClippedAdamW._resolve_pending_finite = lambda optimizer: setattr(optimizer, "_pending_finite", None)
        try:
            yield
        finally:
            (_cuda.supports_adamw, _cuda.adamw_step), torch._foreach_add_ = original, original_add
            ClippedAdamW._resolve_pending_finite = original_resolve

    def host_call(self, kind: str, compiled: bool = False, name: str = ""):
        if self.recording:
            self.host.append(HostCall(kind, self.phase, compiled, name))

    def _dispatch_compiled(self) -> bool:
        """Whether an aten op dispatched now is inside a compiled region (as Op.compiled is)."""
        return self._compiled_op(self._phase(None)) and not self._attributed

    def record_triton(self, kernel, args, kwargs):
        if not self.recording:
            return
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        seen, reads, writes = set(), [], []
        for t in _tensors(list(args) + list(kwargs.values())):
            self._keep.append(t.untyped_storage())
            key = (_storage_key(t), t.storage_offset(), tuple(t.shape))
            if key in seen:
                continue
            seen.add(key)
            entry = (_storage_key(t), _footprint(t))
            (writes if _storage_key(t) in self._fresh else reads).append(entry)
        for key, _ in writes:
            self._fresh.discard(key)
        category, _ = _stack_context()
        op = Op(f"triton:{name}", self._phase(category), "", read=sum(b for _, b in reads),
                written=sum(b for _, b in writes), launches=1, fused_region=True, anchor=True, reads=reads,
                writes=writes)
        if name in _TRITON_ATTENTION:
            q = next(_tensors(args))
            qk_norm = bool(kwargs.get("QK_NORM", False))
            op.flops, op.model_flops = _triton_attention_flops(name, q, qk_norm)
            op.matmul_dtype = "fp32" if q.dtype == torch.float32 else "bf16"
            op.shapes = f"q {tuple(q.shape)} {str(q.dtype).replace('torch.', '')}"
        if name in _TRITON_MATMULS:
            op.flops, op.model_flops = _triton_matmul_flops(name, args)
            op.matmul_dtype = "fp32" if next(_tensors(args)).dtype == torch.float32 else "bf16"
            op.shapes = "M N K " + " ".join(str(int(v)) for v in args[5:8])
        op.category = op_category(op.name, op.phase, category)
        op.compiled = self._compiled_op(op.phase)
        op.step_phase = self.phase
        self.ops.append(op)

    # -- phases ------------------------------------------------------------------------------------
    def _node_meta(self):
        node = torch._C._current_autograd_node()
        return node.metadata if node is not None else {}

    def _phase(self, stack_category):
        if self.phase == "backward":
            meta = self._node_meta()
            if stack_category == "losses" or meta.get("phase") == "loss":
                return "loss"
            return "backward"
        if self.phase == "forward" and not self.in_model:
            return "loss"
        return self.phase

    def _model_flag(self) -> bool:
        if self.phase == "forward":
            return self.in_model
        if torch._C._current_autograd_node() is None:  # the backward's seed gradient: the engine's, not the model's
            return False
        return self._node_meta().get("model", True)

    def _compiled_op(self, phase) -> bool:
        if phase == "encoder":
            return self.encoder_compiled
        return phase in ("forward", "backward") and self._model_flag()

    def tag_forward_outputs(self):
        """After the forward: put each recorded output's phase and kernels category on its autograd node,
        so the backward ops that the node runs are attributed to them."""
        for out, phase, category, fused, in_model in self._forward_outputs:
            try:
                node = out.grad_fn
            except RuntimeError:  # a view made under no_grad (inside an autograd.Function) and written to
                continue
            if node is not None and "phase" not in node.metadata:
                node.metadata.update(phase=phase, category=category, fused=fused, model=in_model)
        self._count_backward_nodes()
        self._forward_outputs.clear()

    def _count_backward_nodes(self):
        """The host lane's autograd nodes: every node of the graph the forward built (walked from the
        recorded outputs' grad_fn), each run once by the backward. A node inside SiT (its tagged model flag,
        or for an untagged node such as a view's that of the node it was reached from) is in the compiled
        region, except AccumulateGrad, which runs eagerly after a compiled backward too; the backward node of
        a `kernels` op (its FusedOp's autograd.Function) also counts as that op's eager call."""
        stack = []
        for out, in_model in [(o[0], o[4]) for o in self._forward_outputs] + self._graph_roots:
            try:
                stack.append((out.grad_fn, in_model))
            except RuntimeError:
                continue
        self._graph_roots.clear()
        while stack:
            node, model_flag = stack.pop()
            if node is None or id(node) in self._nodes:
                continue
            self._nodes[id(node)] = node
            model_flag = node.metadata.get("model", model_flag)
            accumulate = node.name().endswith("AccumulateGrad")
            compiled = bool(model_flag) and not accumulate
            self.host.append(HostCall("autograd_node", "backward", compiled, node.name()))
            forward_cls = getattr(node, "_forward_cls", None)
            if forward_cls is not None and forward_cls.__module__ == "kernels._autograd":
                self.host.append(HostCall("kernels_op", "backward", compiled, node.name()))
            stack.extend((n, model_flag) for n, _ in node.next_functions)

    def _run_launcher(self, func, args, kwargs):
        """A fused op reached as its registered custom op (under torch.compile, or an eager path that
        calls it): run its real implementation, not its fake one, so its launches and scratch buffers
        are recorded as in eager; the outputs are fake tensors like the fake implementation's."""
        from torch._library.custom_ops import OPDEFS

        implementation = OPDEFS[func._schema.name]._init_fn
        self.host_call("kernels_op", self._dispatch_compiled(), func._schema.name)
        self._opaque += 1  # the aten ops a custom op runs inside are not Inductor's to fuse
        try:
            with self:
                out = implementation(*args, **kwargs)
        finally:
            self._opaque -= 1
        if self.phase == "forward":
            for t in _tensors(out):
                if t.is_floating_point():
                    category, fused = _stack_context()
                    self._forward_outputs.append((t, self._phase(category), category, True, self.in_model))
        return out

    # -- aten ops ------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "alignflow" and self.recording:
            return self._run_launcher(func, args, kwargs)
        out = func(*args, **kwargs)
        if not self.recording:
            return out
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        if name in _ALLOCATIONS:
            self._fresh.update(_storage_key(t) for t in _tensors(out))
        self._keep.extend(t.untyped_storage() for t in _tensors((args, kwargs, out)))
        if name in _FREE or _is_view(func) or func.namespace == "prim":
            if name not in _NO_HOST_CALL and func.namespace != "prim":
                self.host_call("aten_view", self._dispatch_compiled(), name)
            return out
        if name == "copy_" and _same_view(args[0], args[1]):  # aten returns at once: no kernel
            self.host_call("aten_view", self._dispatch_compiled(), name)
            return out
        stack_category, fused = _stack_context()
        if self.phase == "backward" and stack_category is None:
            meta = self._node_meta()
            stack_category, fused = meta.get("category"), meta.get("fused", False)
        phase = self._phase(stack_category)
        if self._attributed:
            phase, stack_category = self._attributed, "optimizer"
        mutated = _mutated_args(func, args, kwargs)
        if name in ("_fused_adamw_", "_fused_adam_") and kwargs.get("grad_scale") is None:
            # its schema lets it unscale the grads in place; without a grad_scale they are only read (with
            # one, GradScaler's or ClippedAdamW's clip divisor, the kernel writes the divided grads back)
            grads = {id(t) for t in args[1]}
            mutated = [t for t in mutated if id(t) not in grads]
        mutated_keys = {_storage_key(t) for t in mutated}
        if name in ("copy_", "_foreach_copy_"):  # reads its sources only
            inputs = list(_tensors(args[1]))
        else:
            inputs = [] if name in _WRITE_ONLY else list(_tensors((args, kwargs)))
        outputs = [t for t in _tensors(out) if _storage_key(t) not in mutated_keys] + mutated
        reads, seen = [], set()
        for t in inputs:
            key = (_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride())
            if key not in seen:
                seen.add(key)
                reads.append((_storage_key(t), _footprint(t)))
        writes, seen = [], set()
        for t in outputs:
            key = (_storage_key(t), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                writes.append((_storage_key(t), _footprint(t)))
                self._fresh.discard(_storage_key(t))
        if not writes:  # a scalar or dtype answer (promote_types, is_nonzero, ...): no kernel
            if name not in _NO_HOST_CALL:
                self.host_call("aten_view", self._dispatch_compiled(), name)
            return out
        op = Op(name, phase, op_category(name, phase, stack_category), read=sum(b for _, b in reads),
                written=sum(b for _, b in writes), launches=1, fused_region=fused, reads=reads, writes=writes)
        op.anchor = self._opaque > 0
        if name.startswith("_foreach_") or name.startswith("_fused_"):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            op.launches = _multi_tensor_launches(lists) + (1 if name == "_foreach_norm" else 0)
            op.anchor = True
        elif name in _MATMULS:
            op.flops = op.model_flops = _matmul_flops(name, args, out)
            op.matmul_dtype = "fp32" if next(_tensors(args)).dtype == torch.float32 else "bf16"
            op.anchor = True
        elif name in _SDPA or name in _SDPA_BACKWARD:
            q = args[1] if name in _SDPA_BACKWARD else args[0]
            k = args[2] if name in _SDPA_BACKWARD else args[1]
            op.flops, op.model_flops = _flash_flops(q, k, name in _SDPA_BACKWARD)
            op.matmul_dtype = "bf16"  # a CPU trace of the bf16 GPU run: flash SDPA is bf16 only
            op.anchor = True
        if op.flops:
            op.shapes = " x ".join(f"{tuple(t.shape)}" for t in inputs[:3])
        op.compiled = self._compiled_op(phase) and not self._attributed  # DeepSpeed's hooks run eagerly
        op.step_phase = self.phase
        self.ops.append(op)
        self.host_call("multi_tensor" if name.startswith(("_foreach_", "_fused_")) else "aten", op.compiled, name)
        if self.phase == "forward":  # autograd gives the outputs their grad_fn after this returns
            for t in _tensors(out):
                if t.is_floating_point():
                    self._forward_outputs.append((t, phase, stack_category, fused, self.in_model))
        return out


# ----------------------------------------------------------------------------------------------
# Tracing the training step
# ----------------------------------------------------------------------------------------------

class _Bucket:
    """One of DeepSpeed's IPG (independent partition gradient) reduce buckets: a flat buffer in the
    weights' dtype that gradients of one communication dtype are copied into as the backward makes them."""

    def __init__(self, elements: int, dtype: torch.dtype):
        self.buffer = torch.empty(elements, dtype=dtype)
        self.params: list = []
        self.elements = 0


class _ZeroOptimizer:
    """DeepSpeed 0.19's ZeRO-1/2 optimizer (runtime/zero/stage_1_and_2.py, DeepSpeedZeroOptimizer) as one
    rank runs it under the trainer's configs (configs/deepspeed/zero1.json, zero2.json as
    engine.config.deepspeed_config completes them: contiguous_gradients, overlap_comm on a GPU,
    reduce_bucket_size 2e8 elements; train.precision bf16 = DeepSpeed's bf16 mode, bf16 weights and an fp32
    master partition; bf16-mixed = fp32 weights with DeepSpeed's torch_autocast, which reduces the
    gradients of Linear/Conv modules in bf16), with optim.fused_clip's hand-over of the clip
    (engine.optim.hand_clipping_to) and the trainer's EMA (engine/ema.py). Each op below is one that
    DeepSpeed, torch's fused AdamW or the EMA runs, with the same operands; tests/test_bench_model_deepspeed.py
    checks them op for op against DeepSpeed itself (the real Trainer on DeepSpeed's CPU accelerator).

    Backward (DeepSpeed's gradient hooks, then the reduction epilogue after the backward), per gradient:
      1. copied into its bucket (reduce_independent_p_g_buckets_and_remove_grads): read + write;
      2. each bucket, when the next gradient would overflow it and after the backward (reduce_ipg_grads ->
         average_tensor): divided in place by the world size (at world size 1 too), all-reduced; a bucket of
         Linear/Conv gradients under bf16-mixed is cast to bf16 for the all-reduce and copied back into the
         bucket twice (allreduce_bucket, then allreduce_and_copy_with_multiple_ranks); otherwise the reduced
         bucket is copied onto itself, which aten skips;
      3. the gradients of this rank's partition copied out of the bucket into the flat partition gradient
         (copy_grads_in_partition): read + write.
    engine.step(), over this rank's partition:
      4. bf16 only, with bf16.check_grad_overflow (`check_overflow`; DeepSpeed's default, which the trainer
         turns off with optim.fused_clip: ClippedAdamW skips a non-finite step itself): amax and amin of every gradient and the scalar isfinite tests of them (has_inf_or_nan),
         each its own kernel;
      5. the global norm (get_grad_norm_direct): every gradient cast to fp64 (DeepSpeed's norm dtype on an
         accelerator with fp64) and its vector_norm, then a handful of scalar ops;
      6. the gradients concatenated into one flat gradient (flatten_dense_tensors_aligned) and cast to fp32
         (a no-op under bf16-mixed);
      7. the clip: unscale_and_clip_grads scales the flat fp32 gradient in place; with optim.fused_clip it
         hands its divisor to the fused AdamW kernel instead (no pass);
      8. torch's fused AdamW on the flat fp32 master (with a divisor, the kernel writes the divided gradient
         back: 16 bytes read and 16 written a parameter);
      9. the master copied into the flat weights (bf16, or fp32 under bf16-mixed);
      10. the all-gather of the updated weights (none at world size 1);
    then the trainer's 11. EMA update: one _foreach_lerp_ over the master's per-parameter fragments, and with
    `weight_copies` (bf16-mixed: train.bf16_weight_copies, 'auto' on a GPU) the trainer's 12. refresh of the
    bf16 weight copies after engine.step() (one _foreach_copy_ over the whole weights, on every rank, which
    zero_projection would divide by N with the step: it projects trainer-bf16, which has no copies).
    Collectives are not traced: at world size 1 they move nothing, and the ZeRO projection (zero_projection)
    models them for more GPUs. With N ranks, 1-2 stay whole on every rank (DeepSpeed all-reduces whole
    buckets, use_multi_rank_bucket_allreduce, and concatenates the slices of a bucket that spans partitions
    first) while 3-9 and 11 run over the rank's 1/N partition: so the ops of 1-2 are in the "backward"
    phase (category optimizer), the rest in the "optimizer" phase, which zero_projection divides by N.
    ZeRO-1 runs the same ops (on a GPU overlap_comm reduces in the hooks as ZeRO-2 does)."""

    clips_gradients = True  # as DeepSpeed does: one_step runs no clip_grad_norm_ before it

    def __init__(self, params, optimizer_cls, ema: bool = False, fused_clip: bool = False, max_norm: float = 1.0,
                 comm_dtypes: dict | None = None, bucket_elements: int = int(2e8), tracer=None,
                 check_overflow: bool = True, weight_copies=None):
        self.params = [p for p in params if p.requires_grad]  # frozen ones (pos_embed) are not the optimizer's
        self.weight_copies = weight_copies  # engine.bf16_copies.WeightCopies of the model, or None
        self.fused_clip, self.max_norm, self.tracer = fused_clip, max_norm, tracer
        self.check_overflow = check_overflow
        self.dtype = self.params[0].dtype
        self.offsets, numel = {}, 0
        for p in self.params:
            self.offsets[p] = numel
            numel += p.numel()
        self.flat_weights = torch.empty(numel, dtype=self.dtype)      # bit16_groups_flat
        self.partition_grads = torch.empty(numel, dtype=self.dtype)   # grads_in_partition
        self.master = torch.empty(numel, dtype=torch.float32, requires_grad=True)  # single_partition_of_fp32_groups
        self.inner = optimizer_cls([self.master])
        if fused_clip:
            self.inner.divisor_from_deepspeed = True
        comm_dtypes = comm_dtypes or {}
        self.comm_dtype = {p: comm_dtypes.get(p, self.dtype) for p in self.params}
        elements = min(bucket_elements, numel)
        self.bucket_elements = elements
        self.buckets = {dtype: _Bucket(elements, self.dtype)
                        for dtype in sorted(set(self.comm_dtype.values()), key=str)}  # sort_dtypes
        self.waiting = set(self.params)  # gradients the backward has still to make
        # the trainer's fp32 EMA of the masters (engine/ema.py: each parameter's fragment of the flat master)
        master = self.master.detach()
        self.fragments = [master.narrow(0, self.offsets[p], p.numel()) for p in self.params] if ema else []
        self.ema = [torch.empty_like(f) for f in self.fragments]
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._gradient_ready)

    def _attributed(self, phase: str):
        return self.tracer.attributed(phase) if self.tracer is not None else contextlib.nullcontext()

    # -- the backward: buckets -------------------------------------------------------------------
    def _gradient_ready(self, p):
        if self.tracer is not None:
            self.tracer.host_call("zero_hook", False, "DeepSpeed gradient hook")
        with self._attributed("backward"):
            bucket = self.buckets[self.comm_dtype[p]]
            if bucket.elements + p.numel() > self.bucket_elements:
                self._reduce(self.comm_dtype[p])
            view = bucket.buffer.narrow(0, bucket.elements, p.numel())
            view.copy_(p.grad.view(-1))
            p.grad = view.view_as(p)
            bucket.params.append(p)
            bucket.elements += p.numel()
        self.waiting.discard(p)
        if not self.waiting:  # the epilogue
            for dtype in self.buckets:
                self._reduce(dtype)
            self.waiting = set(self.params)

    def _reduce(self, comm_dtype):
        bucket = self.buckets[comm_dtype]
        if not bucket.elements:
            return
        with self._attributed("backward"):
            flat = bucket.buffer.narrow(0, 0, bucket.elements)
            flat.div_(1.0)  # by the world size (1)
            if comm_dtype != self.dtype:
                reduced = flat.to(comm_dtype)  # all-reduced in comm_dtype (nothing to move at world size 1)
                flat.copy_(reduced)
                flat.copy_(reduced)
        with self._attributed("optimizer"):
            for p in bucket.params:
                view = self.partition_grads.narrow(0, self.offsets[p], p.numel())
                view.copy_(p.grad.view(-1))
                p.grad = view.view_as(p)
        bucket.params, bucket.elements = [], 0

    # -- engine.step() ---------------------------------------------------------------------------
    @staticmethod
    def _has_inf_or_nan(x):
        return torch.isfinite(x.amax()).logical_and(torch.isfinite(x.amin())).logical_not()

    def step(self):
        if self.waiting != set(self.params):  # gradients set without a backward (the untraced first step)
            for p in [p for p in self.params if p in self.waiting and p.grad is not None]:
                self._gradient_ready(p)
            for dtype in self.buckets:
                self._reduce(dtype)
            self.waiting = set(self.params)
        with self._attributed("optimizer"):
            self._step()

    def _step(self):
        from engine.optim import clip_divisor

        grads = [self.partition_grads.narrow(0, self.offsets[p], p.numel()) for p in self.params]
        bf16 = self.dtype == torch.bfloat16
        if bf16 and self.check_overflow:  # has_overflow_partitioned_grads_serial
            invalid = torch.zeros([1], dtype=torch.float32)
            for g in grads:
                invalid += self._has_inf_or_nan(g)
            invalid.bool().byte()  # all-reduced (MAX) and read on the host
        norms = [torch.linalg.vector_norm(g.to(torch.float64), ord=2.0) for g in grads]  # get_grad_norm_direct
        total = torch.stack(norms).pow(2.0).sum().float().pow(1.0 / 2.0)  # all-reduced (SUM) before the root
        total.masked_fill_(total.isnan().logical_or(total.isinf()), torch.tensor(-1.0))
        stacked = torch.stack([total])  # combine_grad_norm_groups
        invalid = (~torch.isfinite(stacked) | (stacked < 0)).any()
        norm = torch.where(invalid, torch.full_like(stacked[0], float("inf")), torch.linalg.vector_norm(stacked, ord=2))
        if not bf16 or self.check_overflow:
            (~torch.isfinite(norm) | (norm < 0)).any()  # is_invalid_grad_norm (read on the host)
        norm / 1.0  # _global_grad_norm: over the loss scale
        flat = torch.cat(grads)  # flatten_dense_tensors_aligned
        self.master.grad = flat.to(torch.float32)
        if self.fused_clip:  # engine.optim.hand_clipping_to's unscale_and_clip_grads
            norm = torch.where(norm < 0, torch.full_like(norm, float("inf")), norm)
            self.inner.set_clip_divisor(clip_divisor(norm, self.max_norm, 1.0))
        else:  # unscale_and_clip_grads
            clip = torch.clamp(((norm / 1.0) + 1e-6) / self.max_norm, min=1.0)
            self.master.grad.mul_(1.0 / (clip * 1.0))
        self.inner.step()
        self.master.grad = None
        self.flat_weights.copy_(self.master.detach())
        if self.ema:
            torch._foreach_lerp_(self.ema, self.fragments, 1.0 - 0.9999)
        if self.weight_copies is not None:  # Trainer.train_step, after engine.step()
            self.weight_copies.refresh()

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None
        self.master.grad = None


class _StageZeroEngine:
    """DeepSpeed 0.19's engine without ZeRO (train.zero_stage 0) as one rank runs the trainer's step under
    bf16-mixed: no ZeRO optimizer, so no gradient hooks, bucket copies or flat buffers; engine.step() calls
    the trainer's own optimizer (engine.optim.ClippedAdamW with optim.fused_clip: its own norm of the full
    gradients, torch's fused AdamW over the model's fp32 parameters and, with train.bf16_weight_copies, the
    bf16 copies written in its step), then sets the gradients to None (launches nothing); then the trainer's
    EMA update (engine/ema.py at stage 0: one _foreach_lerp_ over the fp32 parameters themselves).
    tests/test_bench_model_deepspeed.py checks these ops against the real trainer at stage 0.

    `allreduce`: DeepSpeed's gradient all-reduce after the backward, which the trainer skips on one rank
    (Trainer._skip_identity_allreduce: the identity there); with it, buffered_allreduce_fallback's work at
    the end of the backward (run here once the backward has made every gradient): the fp32 gradients
    flattened into buckets of `bucket_elements` (MEMORY_OPT_ALLREDUCE_SIZE, 5e8: a bucket closes once it
    holds more), each all-reduced (not traced; fp32 communication, at world size 1 no scaling) and copied
    back into the gradients, per bucket a cat and a copy_ per gradient: 16 bytes a parameter."""

    clips_gradients = True  # ClippedAdamW clips: one_step runs no clip_grad_norm_ before it

    def __init__(self, params, optimizer, ema: bool = True, allreduce: bool = False,
                 bucket_elements: int = 500000000, tracer=None):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer, self.allreduce, self.bucket_elements, self.tracer = optimizer, allreduce, bucket_elements, tracer
        self.sources = [p.detach().view(-1) for p in self.params] if ema else []  # EMA._source of a "full" param
        self.ema = [s.clone() for s in self.sources]
        self.waiting = set(self.params)
        if allreduce:  # to run it where engine.backward does, once the backward has made every gradient
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._gradient_ready)

    def _attributed(self, phase: str):
        return self.tracer.attributed(phase) if self.tracer is not None else contextlib.nullcontext()

    def _gradient_ready(self, p):  # not a host call: DeepSpeed registers no such hook
        self.waiting.discard(p)
        if not self.waiting:  # engine.backward's epilogue: allreduce_no_retain over the module's gradients
            self.waiting = set(self.params)
            from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

            with self._attributed("backward"):
                bucket, numel = [], 0
                for q in self.params:
                    bucket.append(q.grad)
                    numel += q.numel()
                    if numel > self.bucket_elements or q is self.params[-1]:
                        flat = _flatten_dense_tensors(bucket)  # all-reduced in place (the identity at world size 1)
                        for grad, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                            grad.copy_(synced)
                        bucket, numel = [], 0

    def step(self):
        with self._attributed("optimizer"):
            self.optimizer.step()
            if self.ema:  # Trainer.train_step, after engine.step()
                torch._foreach_lerp_(self.ema, self.sources, 1.0 - 0.9999)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=True)  # engine.zero_grad: every gradient set to None


_LOWER_PRECISION_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)  # torch_autocast's
TRAINER_DEEPSPEED_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                      "deepspeed", "zero2.json")  # train.deepspeed_config's default


def _autocast_reduced(model) -> list:
    """The trainable parameters whose gradients DeepSpeed's torch_autocast (bf16-mixed) reduces in bf16: those
    of modules whose class is one of its lower-precision-safe classes (exactly: not a subclass)."""
    return [p for m in model.modules() if type(m) in _LOWER_PRECISION_MODULES
            for p in m.parameters(recurse=False) if p.requires_grad]


def zero_bucket_elements(path: str = TRAINER_DEEPSPEED_JSON) -> int:
    """The reduce bucket size (elements) of the trainer's DeepSpeed JSON (DeepSpeed's default 5e8 without one)."""
    with open(path) as f:
        return int(float(json.load(f).get("zero_optimization", {}).get("reduce_bucket_size", 5e8)))


def zero_checks_grad_overflow(fused_clip: bool, path: str = TRAINER_DEEPSPEED_JSON) -> bool:
    """bf16.check_grad_overflow as the trainer generates it from its DeepSpeed JSON (engine.config: off
    with optim.fused_clip, where ClippedAdamW skips a non-finite step, unless the file sets it)."""
    from engine.config import checks_grad_overflow

    with open(path) as f:
        return checks_grad_overflow(json.load(f).get("bf16", {}), fused_clip)


def _patched_foreach():
    """clip_grad_norm_ picks its foreach path (one multi-tensor norm, as on CUDA) for fake tensors too."""
    import torch.nn.utils.clip_grad as clip

    @contextlib.contextmanager
    def patch():
        original = clip._has_foreach_support
        clip._has_foreach_support = lambda tensors, device: True
        try:
            yield
        finally:
            clip._has_foreach_support = original
    return patch()


def trace_step(model="SiT-XL/2", batch=32, resolution=256, encoder="dinov2-vit-b", encoder_depth=8, reg=False,
               car_flow="none", precision="bf16-mixed", backend="triton", model_overrides=None,
               trainer: bool = False, fused_clip: bool = False, bf16_copies: bool | None = None,
               model_config: dict | None = None, zero_stage: int = 2, allreduce: bool = False,
               step_kernel: str = "torch", bf16_grads: bool | None = None) -> dict:
    """Trace one training step of bench.train_step (build + one_step) on fake tensors; `trainer`: with
    DeepSpeed ZeRO-2's flat-buffer optimizer and the trainer's EMA update (see TRAINER_VARIANTS), or at
    `zero_stage` 0 (bf16-mixed, `fused_clip`) DeepSpeed's engine without ZeRO (_StageZeroEngine: the
    trainer's ClippedAdamW and EMA; `allreduce`: with the gradient all-reduce the trainer skips);
    `fused_clip`: the clip inside the fused AdamW step (engine.optim.ClippedAdamW; under `trainer`,
    DeepSpeed's norm and its divisor handed over), else clip_grad_norm_ then AdamW; `bf16_copies`: the
    matmuls read bf16 copies of the weights written after the optimizer step (engine/bf16_copies.py; by
    ClippedAdamW itself, or under `trainer` after DeepSpeed's step) instead of autocast's casts (None: as
    the trainer's train.bf16_weight_copies 'auto' on a GPU for `trainer`, else off); `step_kernel`:
    ClippedAdamW's (with `fused_clip`, outside `trainer` or at its stage 0): torch's fused AdamW or "alignflow", the CUDA
    C++ kernel of csrc/adamw.cu (Tracer.intercept_cuda_adamw); `bf16_grads`: the copies take the matmuls'
    weight gradients in bf16 and that kernel reads them (engine/bf16_copies.py grads; None: as the trainer's
    train.bf16_weight_grads 'auto' on one GPU: on for `trainer` at stage 0 with the kernel and the copies,
    else off); `model_config`: SiT
    config keys set over the built config (OPT_IN_VARIANTS); returns
    {"ops": [Op], "model_flops": analytic step FLOPs, "params": count, "linear_params": count,
    "bf16_copied_params": count}."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench import train_step
    from bench.flops import training_step_flops
    from engine.models import build_model

    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: allowed {list(PRECISIONS)}")
    if trainer and zero_stage not in MODELLED_ZERO_STAGES:
        raise ValueError(f"the trainer at ZeRO stage {zero_stage!r}: modelled at {list(MODELLED_ZERO_STAGES)}")
    stage_zero = trainer and zero_stage == 0
    if stage_zero and not (precision == "bf16-mixed" and fused_clip):
        raise ValueError(f"the trainer at ZeRO stage 0 under --precision {precision!r}, fused_clip={fused_clip}: "
                         "modelled under bf16-mixed with fused_clip only (the trainer's one-GPU recommendation)")
    if step_kernel != "torch" and not (fused_clip and (stage_zero or not trainer)):
        raise ValueError(f"step_kernel {step_kernel!r}: modelled in ClippedAdamW (fused_clip), outside the trainer "
                         "or in it at ZeRO stage 0")
    if bf16_grads and not (step_kernel == "alignflow" and bf16_copies is not False and not allreduce):
        raise ValueError("bf16_grads: modelled with bf16 copies, step_kernel 'alignflow' and no gradient all-reduce")
    if allreduce and not stage_zero:
        raise ValueError("allreduce: DeepSpeed's stage-0 gradient all-reduce, modelled with trainer=True, zero_stage=0")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels pick their Triton path for CPU (fake) tensors
    args = argparse.Namespace(smoke=False, encoder=encoder, resolution=resolution, batch=batch, model=model,
                              encoder_depth=encoder_depth, reg=reg, car_flow=car_flow)
    meta = torch.device("meta")
    with meta:
        if model_overrides:
            encoder_module, cfg, transport, encoder_flops = _build_small(args, model_overrides)
        else:
            encoder_module, cfg, transport, encoder_flops = train_step.build(args, meta)
        if backend == "torch":  # the reference variants run REPA's encoder path (bench.train_step.variant_encoder)
            encoder_module = train_step.reference_encoder(encoder_module)
        encoder_module.low_precision_devices = ("cuda", "cpu")  # its CUDA path (bf16), on fake CPU tensors
        encoder_module.cast_weights(torch.bfloat16)  # the fused encoder's one-time cast (on meta: see below)
        if backend == "triton" and cfg.fused_bias_grad == "auto":
            cfg.fused_bias_grad = True  # its 'auto' on a GPU with the Triton kernels (the trace's tensors: CPU)
        if model_config:
            cfg = dataclasses.replace(cfg, **model_config)
        sit = build_model(cfg)
        if precision == "bf16":
            sit.to(torch.bfloat16)  # on meta: fake parameters cannot be swapped for other dtypes later
    model_flops = sit.flops_per_sample()
    # DeepSpeed's torch_autocast (bf16-mixed) reduces the gradients of these modules' parameters in bf16
    linear_params = sum(p.numel() for p in _autocast_reduced(sit))
    params = sum(p.numel() for p in sit.parameters() if p.requires_grad)  # what the optimizer and ZeRO shard
    tracer = Tracer()
    tracer.recording = False
    with FakeTensorMode(allow_non_fake_inputs=True):
        encoder_module.to_empty(device="cpu")
        tracer.encoder_compiled = encoder_module.cfg.fused  # compiled variants compile the fused encoder
        sit.to_empty(device="cpu").train()
        if bf16_copies is None:
            bf16_copies = trainer and precision == "bf16-mixed"  # the trainer's auto on a GPU (ZeRO 0-2)
        if bf16_copies and precision != "bf16-mixed":
            raise ValueError(f"bf16 weight copies under --precision {precision!r}: allowed under bf16-mixed only")
        if bf16_grads is None:
            bf16_grads = stage_zero and step_kernel == "alignflow" and bf16_copies and not allreduce
        copies = None
        if bf16_copies:
            from engine.bf16_copies import WeightCopies

            copies = WeightCopies(sit, grads=bool(bf16_grads))
        if fused_clip:
            from engine.optim import ClippedAdamW

            fused = lambda p: ClippedAdamW(p, max_norm=train_step.CLIP, lr=1e-4, betas=(0.9, 0.999),  # noqa: E731
                                           weight_decay=0.0, step_kernel=step_kernel)
        else:
            fused = lambda p: torch.optim.AdamW(p, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=True)  # noqa: E731
        comm_dtypes = {p: torch.bfloat16 for p in _autocast_reduced(sit)} if precision == "bf16-mixed" else {}
        optimizer = (_ZeroOptimizer(sit.parameters(), fused, ema=trainer, fused_clip=fused_clip,
                                    max_norm=train_step.CLIP, comm_dtypes=comm_dtypes,
                                    bucket_elements=zero_bucket_elements(), tracer=tracer,
                                    check_overflow=zero_checks_grad_overflow(fused_clip), weight_copies=copies)
                     if precision == "bf16" or (trainer and not stage_zero) else fused(sit.parameters()))
        if copies is not None and not isinstance(optimizer, _ZeroOptimizer):
            if not fused_clip:
                raise ValueError("bf16 weight copies without ZeRO are written by ClippedAdamW: pass fused_clip=True")
            optimizer.set_bf16_copies(copies.mapping())
            if copies.grads:
                optimizer.set_gradient_source(copies)
        if stage_zero:
            optimizer = _StageZeroEngine(sit.parameters(), optimizer, ema=True, allreduce=allreduce, tracer=tracer)
        latents = torch.randn(batch, cfg.in_channels, resolution // 8, resolution // 8)
        images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
        labels = torch.randint(0, cfg.num_classes, (batch,))
        if precision == "bf16":
            latents = latents.to(torch.bfloat16)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        phases = iter(("forward", "backward", "optimizer", "done"))

        def mark():
            if tracer.phase == "forward":
                tracer.tag_forward_outputs()
            tracer.phase = next(phases)

        class Forward:  # the module's forward, marked; `module` lets transport.unwrap find the model
            module = sit

            def __call__(self, *a, **k):
                tracer.in_model = True
                try:
                    return sit(*a, **k)
                finally:
                    tracer.in_model = False

        forward = Forward()

        def encode(images):  # the encoder's own CUDA autocast (bf16) is off for CPU tensors: the CPU one stands in
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return encoder_module(images)

        step_inputs = (sit, forward, optimizer, encode, transport, latents, cfg, autocast, backend,
                       images, labels)
        with tracer, tracer.intercept_triton(), tracer.intercept_cuda_adamw(), _patched_foreach(), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            for p in sit.parameters():  # an unrecorded optimizer step creates the optimizer state
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracer.phase, tracer.recording = "encoder", True
            train_step.one_step(*step_inputs, mark=mark)
    return {"ops": tracer.ops, "host": tracer.host,
            "model_flops": training_step_flops(model_flops, batch, encoder_flops),
            "sit_flops_per_sample": model_flops, "encoder_flops_per_image": encoder_flops, "params": params,
            "linear_params": linear_params, "num_patches": cfg.num_patches,
            "bf16_copied_params": copies.numel() if copies is not None else 0}


def _build_small(args, overrides):
    """bench.train_step.build's parts for a model with `overrides` (tests: a narrow SiT), on meta."""
    from bench.flops import vit_forward_flops
    from engine.models import ModelConfig
    from engine.models.encoders import EncoderConfig, build_encoder
    from engine.transport import Transport, TransportConfig

    encoder = build_encoder(EncoderConfig(name=args.encoder, pretrained=False, resolution=args.resolution),
                            device=torch.device("meta"))
    cfg = ModelConfig(name=args.model, input_size=args.resolution // 8, num_classes=1000,
                      encoder_depth=min(args.encoder_depth, overrides.get("depth", 99)), z_dims=[encoder.embed_dim],
                      reg=args.reg, car_flow=args.car_flow, **overrides)
    vit = encoder.model
    tokens = encoder.num_patches
    flops = vit_forward_flops(encoder.embed_dim, len(vit.blocks), tokens + encoder.num_prefix_tokens,
                              vit.patch_embed.patch_size[0])
    return encoder, cfg, Transport(TransportConfig(time_sampling="lognormal")), flops


# ----------------------------------------------------------------------------------------------
# Inductor's fusion (compiled variants)
# ----------------------------------------------------------------------------------------------

def fuse_compiled(ops: list[Op]) -> list[Op]:
    """The compiled module's ops as Inductor is modelled to run them: each maximal run of consecutive
    non-anchor ops of the compiled module (same phase) becomes one kernel reading each storage it takes
    from outside the run once and writing each storage that an op after the run reads."""
    readers = defaultdict(list)  # storage -> indices of the ops that read it
    for i, op in enumerate(ops):
        for key, _ in op.reads:
            readers[key].append(i)
    out, run = [], []

    def close():
        if not run:
            return
        first, last = run[0], run[-1]
        produced, external_in = {}, {}
        for i in run:
            for key, size in ops[i].reads:
                if key not in produced:
                    external_in[key] = max(external_in.get(key, 0), size)
            for key, size in ops[i].writes:
                produced[key] = max(produced.get(key, 0), size)
        external_out = {k: s for k, s in produced.items() if any(j > last for j in readers[k])}
        members = [ops[i] for i in run]
        names = sorted({m.name for m in members})
        categories = defaultdict(float)
        for m in members:
            categories[m.category] += m.bytes + 1.0
        category = max(categories, key=categories.get)
        out.append(Op(f"inductor:{'+'.join(names[:4])}{'+...' if len(names) > 4 else ''}", ops[first].phase,
                      category, read=float(sum(external_in.values())), written=float(sum(external_out.values())),
                      launches=1 if any(m.launches for m in members) else 0, compiled=True,
                      fused_region=all(m.fused_region for m in members),
                      shapes=f"{len(run)} ops fused", reads=list(external_in.items()),
                      writes=list(external_out.items()), step_phase=ops[first].step_phase))
        run.clear()

    for i, op in enumerate(ops):
        fusible = op.compiled and not op.anchor
        if run and (not fusible or ops[run[-1]].phase != op.phase):
            close()
        if fusible:
            run.append(i)
        else:
            out.append(op)
    close()
    return out


def capture_graphs(ops: list[Op]) -> list[Op]:
    """The compiled variant's ops with Inductor's CUDA graphs (torch.compile mode="reduce-overhead"):
    each maximal run of consecutive compiled ops of one step phase (the fused encoder's forward, SiT's
    forward, SiT's backward) is one graph, replayed with one launch; its kernels then cost GRAPH_NODE_S
    each instead of a launch. The eager ops between (losses, clipping, AdamW) launch as before."""
    out, previous = [], None
    for op in ops:
        region = op.step_phase if op.compiled else None
        if region is None:
            out.append(op)
        else:
            out.append(dataclasses.replace(op, graph=True, graph_start=region != previous and bool(op.launches)))
            if not op.launches:
                region = previous  # a launch-free op does not start a graph
        previous = region
    return out


# ----------------------------------------------------------------------------------------------
# The host lane
# ----------------------------------------------------------------------------------------------

STEP_PHASES = ("encoder", "forward", "backward", "optimizer")  # bench.train_step's breakdown (its fwd+loss: forward)
# The calls the host makes, by kind: each costs the host HOST_COSTS[kind] seconds, whatever the GPU does.
HOST_KINDS = {
    "aten": "an aten op that launches a kernel, dispatched eagerly (Python, dispatcher, allocator, the launch)",
    "aten_view": "an aten op dispatched eagerly that launches nothing (a view, an allocation, an aliasing copy_)",
    "kernels_op": "one of our `kernels` ops called eagerly, forward or backward (its autograd.Function, checks "
                  "and Triton launch(es); the aten ops it runs are counted as such), or called as its custom op "
                  "by Inductor's wrapper",
    "autograd_node": "an autograd node run by the backward engine (every node of the forward's graph, "
                     "AccumulateGrad included; inside a compiled region none: its backward is one compiled call)",
    "zero_hook": "DeepSpeed's per-parameter gradient hook in the trainer-* rows' backward (its bucket copies are "
                 "counted as aten ops)",
    "multi_tensor": "a fused or foreach (multi-tensor) call: the optimizer's AdamW, norms, EMA lerp",
    "inductor_launch": "a kernel launched by Inductor's compiled wrapper (one per kernel of a compiled region)",
    "graph_replay": "a CUDA graph replayed (torch.compile mode reduce-overhead): one launch for the region",
}
# Seconds per call, fitted by fit_host_costs to the measured H200 step and the host counts of the model's
# result beside it (model-h200-2026-12-04.json): non-negative least squares on the relative error over the
# host-bound phases (`python -m bench.model --fit-host` reruns it; tests/test_bench_model.py checks these
# are its answer, to 0.01 us). HOST_PRIORS' kinds are not fitted. autograd_node came out 0: in these rows its
# count moves with the aten ops' (each node runs some), so the fit cannot separate the two and gives the
# aten ops the whole cost. kernels_op's 132 us agrees with the kernel benchmark's per-call host-bound
# times on the same machine (triton adaln_modulate forward 132 us).
HOST_COSTS_SOURCE = "fitted to train_step-NVIDIA-H200-2026-12-04.json"
HOST_COSTS = {"aten": 30.25e-6, "aten_view": 6.41e-6, "kernels_op": 132.49e-6, "autograd_node": 0.0,
              "zero_hook": 23.25e-6, "multi_tensor": 100e-6, "inductor_launch": 64.47e-6, "graph_replay": 10e-6}
HOST_PRIORS = {  # kinds not fitted: (cost, why)
    "graph_replay": (10e-6, "assumed (cudaGraphLaunch's host cost), not fitted: no *-graphs variant was measured"),
    "multi_tensor": (100e-6, "assumed (one multi_tensor_apply call over a few hundred tensors), not fitted: no phase "
                             "that such calls bound was measured; the optimizer phases' excess over the device lane "
                             "is the device's or noise (the same ops measured 8.0 to 11.9 ms across variants)"),
}
HOST_FIT_MARGIN = 0.10  # a measured phase more than this above its device lane is host-bound: the fit's rows


def count_host(calls: list[HostCall], ops: list[Op], compiled: bool = False) -> dict:
    """{step phase: {host kind: calls}} of one variant: the traced eager calls; in a compiled variant the
    calls inside compiled regions are replaced by one Inductor launch per kernel of the region (`ops`
    after fuse_compiled), our kernels' own Triton launches excepted (their custom op's Python launcher
    runs as in eager: its kernels_op call stays); with CUDA graphs (`ops` after capture_graphs) by one
    replay per graph, the kernels_op calls inside it too."""
    counts = {sp: dict.fromkeys(HOST_KINDS, 0) for sp in STEP_PHASES}
    graphs = any(op.graph for op in ops)
    for call in calls:
        if compiled and call.compiled and (call.kind != "kernels_op" or graphs):
            continue
        counts[call.step_phase][call.kind] += 1
    if compiled:
        for op in ops:
            if not op.compiled or not op.launches:
                continue
            if op.graph:
                counts[op.step_phase]["graph_replay"] += int(op.graph_start)
            elif not op.name.startswith("triton:"):
                counts[op.step_phase]["inductor_launch"] += op.launches
    return counts


def host_seconds(counts: dict, costs: dict | None = None) -> dict:
    """{step phase: host seconds}: each call at its kind's cost."""
    costs = HOST_COSTS if costs is None else costs
    return {sp: sum(n * costs[kind] for kind, n in c.items()) for sp, c in counts.items()}


def compose_phases(device: dict, host: dict) -> tuple[dict, dict]:
    """({step phase: seconds}, {step phase: "host" or "device"}): each phase takes the longer of its two
    lanes. The assumption: inside a phase the host enqueues ahead of the GPU, overlapping fully (the GPU
    never waits while the host is ahead, the host never waits on the GPU: no host sync), and no backlog
    carries from one phase into the next."""
    phases = {sp: max(device.get(sp, 0.0), host.get(sp, 0.0)) for sp in STEP_PHASES}
    bound = {sp: "host" if host.get(sp, 0.0) > device.get(sp, 0.0) else "device" for sp in STEP_PHASES}
    return phases, bound


def host_fit_rows(step_payload: dict, model_payload: dict) -> list[dict]:
    """One row per (measured variant, step phase) that the model has host counts for: measured and
    device-lane seconds and the host counts."""
    rows = []
    for r in step_payload["variants"]:
        v = model_payload["variants"].get(r["variant"])
        if "seconds_per_step" not in r or not v or "host_counts" not in v:
            continue
        for sp in STEP_PHASES:
            rows.append({"variant": r["variant"], "phase": sp, "measured_s": r["breakdown_seconds"][sp],
                         "device_s": v["breakdown_seconds"].get(sp, 0.0), "counts": v["host_counts"][sp]})
    return rows


def fit_host_costs(rows: list[dict], margin: float = HOST_FIT_MARGIN, priors: dict | None = None) -> dict:
    """The host costs that best explain the host-bound phases. The fit's rows: those whose measured time
    is more than `margin` above the device lane (the host lane must carry them); non-negative least
    squares on the relative error (count . cost - measured) / measured over them, for every kind counted
    in them (the `priors`' kinds, HOST_PRIORS by default, keep their cost); then the rows whose fitted
    host lane stays below their device lane (the fit says the device bounds them: their excess is not
    the host's) leave the fit, which is rerun until no row leaves. Returns {"costs", "fitted" (kinds),
    "rows" (each with its host and composed seconds, its error with and without the host lane and
    whether it was in the fit), "rms_error" (composed, over every row)}."""
    import numpy as np
    from scipy.optimize import nnls

    priors = {k: v for k, (v, _) in (HOST_PRIORS if priors is None else priors).items()}
    costs = {k: 0.0 for k in HOST_KINDS}
    costs.update(priors)

    def host(r):
        return sum(n * costs[k] for k, n in r["counts"].items())

    bound = [r for r in rows if r["measured_s"] > (1 + margin) * r["device_s"]]
    kinds = []
    while bound:
        kinds = [k for k in HOST_KINDS if k not in priors and any(r["counts"].get(k, 0) for r in bound)]
        if not kinds:
            break
        a = np.array([[r["counts"].get(k, 0) / r["measured_s"] for k in kinds] for r in bound])
        b = np.array([1.0 - sum(r["counts"].get(k, 0) * v for k, v in priors.items()) / r["measured_s"]
                      for r in bound])
        solution, _ = nnls(a, b)
        costs.update({k: float(x) for k, x in zip(kinds, solution)})
        kept = [r for r in bound if host(r) >= r["device_s"]]
        if len(kept) == len(bound):
            break
        bound = kept
    out, errors = [], []
    for r in rows:
        host_s = host(r)
        composed = max(host_s, r["device_s"])
        error = (composed - r["measured_s"]) / r["measured_s"]
        errors.append(error)
        out.append(dict(r, host_s=host_s, composed_s=composed, error=error,
                        device_error=(r["device_s"] - r["measured_s"]) / r["measured_s"],
                        in_fit=any(r is b for b in bound)))
    return {"costs": costs, "fitted": kinds, "rows": out,
            "rms_error": math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else None}


# ----------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------

def is_attention(op: Op) -> bool:
    """An attention kernel (ours or SDPA's), in SiT or the encoder: its FLOPs run at the attention efficiency."""
    return op.category == "attention" or op.name.startswith("triton:_attn") or op.name in _SDPA | _SDPA_BACKWARD


def launch_seconds(op: Op, launch_s: float = LAUNCH_S) -> float:
    return op.launches * (GRAPH_NODE_S if op.graph else launch_s) + (launch_s if op.graph_start else 0.0)


def op_seconds(op: Op, ceilings: dict, launch_s: float = LAUNCH_S, matmul_scale: float = 1.0) -> float:
    compute = 0.0
    if op.flops:
        rate = ceilings["bf16" if op.matmul_dtype != "fp32" else "tf32"] * matmul_scale
        if is_attention(op):
            rate *= ceilings["attention_efficiency"]
        compute = op.flops / rate
    return max(compute, op.bytes / ceilings["bandwidth"]) + launch_seconds(op, launch_s)


def summarize(ops: list[Op], ceilings: dict, batch: int, model_flops: float, launch_s: float = LAUNCH_S,
              top: int = 12, host_counts: dict | None = None, host_costs: dict | None = None) -> dict:
    """The modelled step: the device lane (every op's time, summed: categories, phases, breakdown_seconds,
    device_step_s) and, with `host_counts` (count_host), the host lane per step phase (host_seconds) and
    each phase as the longer of the two (phase_seconds, bound_by: compose_phases); step_s is their sum
    (without host counts: the device lane's); and the counts that goal_budget takes (budget_counts)."""
    times = [op_seconds(op, ceilings, launch_s) for op in ops]
    device_step = sum(times)
    categories = {c: 0.0 for c in CATEGORIES}
    counts = {c: {"bytes": 0.0, "flops": 0.0, "launches": 0} for c in CATEGORIES}
    for op, s in zip(ops, times):
        categories[op.category] += s
        counts[op.category]["bytes"] += op.bytes
        counts[op.category]["flops"] += op.flops
        counts[op.category]["launches"] += op.launches
    grouped = defaultdict(lambda: {"seconds": 0.0, "bytes": 0.0, "flops": 0.0, "launches": 0, "calls": 0})
    for op, s in zip(ops, times):
        g = grouped[(op.phase, op.category, op.name)]
        g["seconds"] += s
        g["bytes"] += op.bytes
        g["flops"] += op.flops
        g["launches"] += op.launches
        g["calls"] += 1
    top_ops = sorted(({"phase": k[0], "category": k[1], "op": k[2], **v} for k, v in grouped.items()),
                     key=lambda r: -r["seconds"])[:top]
    amdahl = sum(s for op, s in zip(ops, times) if not op.fused_region)
    peak = ceilings["peak_bf16"]
    ideal = sum(op.flops for op in ops) / peak  # only matmuls, convolutions and attention have FLOPs
    sensitivity = {
        "launch_us": {str(us): sum(op_seconds(op, ceilings, us * 1e-6) for op in ops) for us in (0, 2, 4, 6)},
        "matmul_of_peak": {f"{f:.1f}": sum(op_seconds(op, ceilings, launch_s,
                                                      f * ceilings["peak_bf16"] / ceilings["bf16"]) for op in ops)
                           for f in (0.6, 0.8, 1.0)},
    }
    phases, breakdown = defaultdict(float), {k: 0.0 for k in STEP_PHASES}
    for op, s in zip(ops, times):
        phases[op.phase] += s
        breakdown[op.step_phase] = breakdown.get(op.step_phase, 0.0) + s
    lanes = {}
    step = device_step
    if host_counts is not None:
        host = host_seconds(host_counts, host_costs)
        composed, bound = compose_phases(breakdown, host)
        step = sum(composed.values())
        lanes = {"host_counts": host_counts, "host_seconds": host, "phase_seconds": composed, "bound_by": bound}
    return {"step_s": step, "device_step_s": device_step, **lanes,
            "img_per_s": batch / step, "mfu": model_flops / step / peak,
            "categories": categories, "counts": counts, "phases": dict(phases),
            "breakdown_seconds": breakdown,  # bench.train_step's columns (its fwd+loss is "forward")
            "bytes": sum(op.bytes for op in ops), "launches": sum(op.launches for op in ops),
            "graph_launches": sum(op.launches for op in ops if op.graph),  # kernels replayed from CUDA graphs
            "graphs": sum(op.graph_start for op in ops),
            "flops_executed": sum(op.flops for op in ops), "flops_model_counted": sum(op.model_flops for op in ops),
            "amdahl_step_s": amdahl, "amdahl_img_per_s": batch / amdahl if amdahl else None,
            "ideal_step_s": ideal, "ideal_img_per_s": batch / ideal if ideal else None,
            "top_ops": top_ops, "sensitivity_step_s": sensitivity, **budget_counts(ops, times, ceilings, launch_s)}


# ----------------------------------------------------------------------------------------------
# Issue 14's goal: the fused step against the reference and the device
# ----------------------------------------------------------------------------------------------

GOAL_SPEEDUPS = {"reference-eager": 1.8, "reference-compiled": 1.3}  # the fused step's img/s over each
GOAL_MFU = 0.5  # model FLOPs per second over the dense bf16 peak


def optimizer_floor_bytes(trainer: bool) -> int:
    """Bytes a parameter that one optimizer step must move at the least, under either precision: the fp32
    master and both AdamW moments read and written (24), the gradient read once in bf16 as the matmuls make
    it (2; under bf16-mixed kept so by train.bf16_weight_grads), the bf16 weights the next forward reads
    written (2: the bf16 weights, or under bf16-mixed their copies, else autocast casts them at every
    forward), and the trainer's fp32 EMA read and written (8; it shares the master's read when fused into
    the same kernel)."""
    return 24 + 2 + 2 + (8 if trainer else 0)


_MEMORY_BOUND = ("norm/modulate", "pointwise", "casts/copies", "reductions", "losses")


def floor_legend() -> dict:
    """Per category: what its floor is, why it cannot go below it and what would move it (goal_table)."""
    memory = ("no FLOPs, floor 0: moved only by fusing its bytes and launches into the matmul/attention kernels "
              "beside it")
    return {
        "matmul": (f"floor = its executed FLOPs at the dense bf16 peak (TF32 matmuls too); modelled at "
                   f"{MATMUL_EFFICIENCY:.0%} of the peak, so only a faster GEMM or fewer executed FLOPs move it"),
        "attention": (f"floor = its executed FLOPs (head-dim padding, backward recompute) at the dense peak; "
                      f"modelled at {ATTENTION_EFFICIENCY:.0%} of it: a faster kernel, less padding or recompute"),
        "optimizer": ("floor = the bytes its step must move at the modelled bandwidth: the fp32 master and both "
                      "moments read and written (24 B a parameter), the gradient read in bf16 as the matmuls make "
                      "it (2), the bf16 weights the next forward reads written (2), the EMA read and written "
                      "(trainer-* rows: 8); above it are fp32 gradients, "
                      "extra passes over the state (DeepSpeed's bucket copies, division, overflow check, fp64 norm "
                      "casts, concatenation and cast) and per-gradient launches: one fused pass moves it"),
        "encoder": ("floor = its matmul/attention FLOPs at the dense peak, its memory-bound ops free: fusing them, "
                    "or fewer encoder FLOPs, move it"),
        **{c: memory for c in _MEMORY_BOUND},
        "host": ("the host lane's time above the device lane in the phases it bounds (host-bound phases: the GPU "
                 "waits on the host's calls); floor 0: fewer calls (fused kernels, torch.compile) or one replay "
                 "per region (CUDA graphs) move it"),
    }


def category_floor(category: str, v: dict, peak_bf16: float, bandwidth: float | None) -> tuple[float, str]:
    """(floor seconds, a note on this variant's figures) of one category of a variant's modelled step:
    its executed FLOPs at the dense bf16 peak; for the optimizer, the larger of that and the bytes its step
    must move (optimizer_floor_bytes a parameter) at the modelled `bandwidth`. floor_legend says why."""
    if category == "host":
        bound = [sp for sp, lane in v.get("bound_by", {}).items() if lane == "host"]
        return 0.0, f"host-bound: {', '.join(bound) or 'none'}"
    counts = v["counts"][category]
    floor = counts.get("flops", 0.0) / peak_bf16
    launches = counts.get("launches", 0)
    if category == "optimizer" and v.get("params") and bandwidth:
        per_param, params = v["optimizer_floor_bytes_per_param"], v["params"]
        floor = max(floor, per_param * params / bandwidth)
        return floor, f"{counts.get('bytes', 0.0) / params:.0f} B a parameter vs {per_param}, {launches} launches"
    if counts.get("flops"):
        return floor, f"{counts['flops'] / 1e12:.1f} TFLOP"
    return floor, f"{counts.get('bytes', 0.0) / 1e9:.1f} GB, {launches} launches"


def _memory_bound(op: Op) -> bool:
    """An op the budget's GEMM-boundary floor covers: no FLOPs, not the optimizer's, not attention's."""
    return not op.flops and op.category != "optimizer" and not is_attention(op)


def gemm_boundary_bytes(ops: list[Op]) -> dict:
    """{category: bytes} that its memory-bound ops must move beside the cuBLAS GEMMs (aten matmuls): cuBLAS
    writes each output to memory and reads each input from it, so in each step phase a memory-bound op
    reads each GEMM output it uses once (the first such read counts), and each GEMM input that one writes
    is written once. Left out, as other kernels could take them: tensors that an attention kernel also
    reads or writes, and the reads of ops whose outputs only the optimizer reads (the weight gradients'
    fp32 casts: its pass reads the gradients anyway). Storage keys are never reused (Tracer._keep)."""
    attention = {key for op in ops if is_attention(op) for key, _ in op.reads + op.writes}
    writer, consumed = {}, set()  # storage -> its last writer; writers that a non-optimizer op reads
    for i, op in enumerate(ops):
        consumed.update(writer[key] for key, _ in op.reads if key in writer and op.category != "optimizer")
        writer.update((key, i) for key, _ in op.writes)
    out, writer, seen = defaultdict(float), {}, set()
    for i, op in enumerate(ops):
        for key, size in op.reads:
            if key not in writer or key in attention:
                continue
            j, written = writer[key]
            source = ops[j]
            if _memory_bound(op) and source.name in _MATMULS and i in consumed and (key, j, op.step_phase) not in seen:
                seen.add((key, j, op.step_phase))
                out[op.category] += min(size, written)
            elif op.name in _MATMULS and _memory_bound(source) and (key, j) not in seen:
                seen.add((key, j))
                out[source.category] += min(size, written)
        writer.update((key, (i, size)) for key, size in op.writes)
    return dict(out)


def budget_counts(ops: list[Op], times: list[float], ceilings: dict, launch_s: float) -> dict:
    """What goal_budget needs of a modelled step: held_seconds, the modelled time of what the budget holds
    (the matmul and attention categories, the encoder's ops with FLOPs); boundary_bytes
    (gemm_boundary_bytes); the GEMMs (ops with FLOPs other than attention), grouped by step phase and
    figures, each with its seconds at the dense peak (at_peak_s), its bytes' seconds and its launches';
    and gemm_efficiency, the modelled GEMM rate over the dense peak."""
    held = {"matmul": 0.0, "attention": 0.0, "encoder": 0.0}
    for op, s in zip(ops, times):
        if op.category in ("matmul", "attention") or (op.category == "encoder" and op.flops):
            held[op.category] += s
    scale = ceilings["peak_bf16"] / ceilings["bf16"]
    groups = defaultdict(int)
    for op in ops:
        if op.flops and not is_attention(op):
            rate = ceilings["bf16" if op.matmul_dtype != "fp32" else "tf32"] * scale
            groups[(op.step_phase, op.flops / rate, op.bytes / ceilings["bandwidth"], launch_seconds(op, launch_s))] += 1
    gemms = [{"step_phase": k[0], "at_peak_s": k[1], "memory_s": k[2], "launch_s": k[3], "count": n}
             for k, n in groups.items()]
    return {"held_seconds": held, "boundary_bytes": gemm_boundary_bytes(ops), "gemms": gemms,
            "gemm_efficiency": ceilings["bf16"] / ceilings["peak_bf16"]}


def step_at_gemm_efficiency(v: dict, efficiency: float) -> float:
    """The modelled step `v` with its GEMMs at `efficiency` of the dense peak (or memory-bound, as
    modelled), everything else as modelled: each step phase's device lane with its GEMMs' time replaced,
    against its host lane (compose_phases)."""
    device = dict(v["breakdown_seconds"])
    for g in v["gemms"]:
        now = max(g["at_peak_s"] / v["gemm_efficiency"], g["memory_s"])
        device[g["step_phase"]] += g["count"] * (max(g["at_peak_s"] / efficiency, g["memory_s"]) - now)
    host = v.get("host_seconds", {})
    return sum(max(s, host.get(sp, 0.0)) for sp, s in device.items())


def gemm_efficiency_needed(v: dict, goal_s: float) -> float | None:
    """The GEMM efficiency (fraction of the dense peak, above 1 where beyond it) at which the step meets
    `goal_s` with everything else as modelled (bisection: the step only falls as GEMMs speed up); None
    where even GEMMs at no compute time miss it."""
    if step_at_gemm_efficiency(v, math.inf) > goal_s:
        return None
    low = high = v["gemm_efficiency"]
    while step_at_gemm_efficiency(v, high) > goal_s and high < 1e6:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if step_at_gemm_efficiency(v, middle) <= goal_s else (middle, high)
    return high


def budget_floor(category: str, v: dict, peak_bf16: float, bandwidth: float | None) -> tuple[float, str]:
    """(floor seconds, note) of one category outside what the budget holds: the optimizer's and the host's
    as category_floor; the others (the encoder's memory-bound ops included) their GEMM-boundary bytes
    (gemm_boundary_bytes) at `bandwidth`, 0 where there are none."""
    if category in ("optimizer", "host"):
        return category_floor(category, v, peak_bf16, bandwidth)
    boundary = v["boundary_bytes"].get(category, 0.0)
    if not boundary or not bandwidth:
        return 0.0, "none derived: fusion moves all of it"
    return boundary / bandwidth, f"{boundary / 1e9:.2f} GB at GEMM boundaries"


def goal_budget(v: dict, goal_s: float, peak_bf16: float, bandwidth: float | None) -> dict:
    """The goal at the modelled rates: what budget_counts holds kept at its modelled time (only a faster
    GEMM or attention kernel moves it), the time left for the rest to meet `goal_s` (budget_s) against
    what the rest takes now (rest_s), each category of the rest with its floor (budget_floor) and the
    sum of the floors; and the GEMM efficiency that meets the goal with the rest as modelled."""
    held = sum(v["held_seconds"].values())
    rest = {c: v["categories"][c] - v["held_seconds"].get(c, 0.0) for c in CATEGORIES
            if c not in ("matmul", "attention")}
    rest["host"] = max(0.0, v["step_s"] - v.get("device_step_s", v["step_s"]))  # (float rounding below 0)
    categories = []
    for category, seconds in rest.items():
        floor, note = budget_floor(category, v, peak_bf16, bandwidth)
        categories.append({"category": category, "modelled_s": seconds, "floor_s": floor, "note": note})
    return {"held_s": held, "held_seconds": v["held_seconds"], "budget_s": goal_s - held,
            "rest_s": v["step_s"] - held, "categories": categories,
            "floor_s": sum(c["floor_s"] for c in categories), "gemm_efficiency": v["gemm_efficiency"],
            "gemm_efficiency_needed": gemm_efficiency_needed(v, goal_s)}


def goal_check(variants: dict, peak_bf16: float, bandwidth: float | None = None) -> list[dict]:
    """For every non-reference variant: its speed-up over each reference variant modelled beside it and
    its MFU, against GOAL_SPEEDUPS and GOAL_MFU; the step time that meets all of them (the strictest
    target names the goal that binds); and, where the step is slower, the categories that stand in the
    way: each category's modelled time above its ideal (its matmul/attention FLOPs at the dense peak,
    everything else free), largest first, as many as it takes to cover the time to cut, each with its
    floor (category_floor: the time it cannot go below at `bandwidth` and the peak, and what moves it)."""
    rows = []
    for name, v in variants.items():
        if name in GOAL_SPEEDUPS:
            continue
        step = v["step_s"]
        targets = {f"{ratio}x {ref}": variants[ref]["step_s"] / ratio for ref, ratio in GOAL_SPEEDUPS.items()
                   if ref in variants}
        targets[f"MFU {GOAL_MFU:.0%}"] = v["mfu"] * step / GOAL_MFU  # model FLOPs / (GOAL_MFU x peak)
        binding = min(targets, key=targets.get)
        goal_s = targets[binding]
        above_ideal = {c: v["categories"][c] - v["counts"][c]["flops"] / peak_bf16 for c in CATEGORIES}
        above_ideal["host"] = step - v.get("device_step_s", step)  # the host lane's excess in host-bound phases
        cut = step - goal_s
        in_the_way, covered = [], 0.0
        for category, excess in sorted(above_ideal.items(), key=lambda kv: -kv[1]):
            if covered >= cut or excess <= 0:
                break
            floor, note = category_floor(category, v, peak_bf16, bandwidth)
            in_the_way.append({"category": category, "above_ideal_s": excess,
                               "modelled_s": v["categories"].get(category, excess), "floor_s": floor, "note": note})
            covered += excess
        rows.append({"variant": name, "step_s": step,
                     "speedups": {ref: variants[ref]["step_s"] / step for ref in GOAL_SPEEDUPS if ref in variants},
                     "mfu": v["mfu"], "targets_s": targets, "binding": binding, "goal_step_s": goal_s,
                     "met": cut <= 0, "to_cut_s": max(0.0, cut), "ideal_step_s": v["ideal_step_s"],
                     "above_ideal_s": above_ideal, "in_the_way": in_the_way if cut > 0 else [],
                     "budget": goal_budget(v, goal_s, peak_bf16, bandwidth) if cut > 0 else None})
    return rows


def goal_table(rows: list[dict]) -> list[str]:
    refs = [r for r in GOAL_SPEEDUPS if any(r in row["speedups"] for row in rows)]
    lines = ["Goal check (issue 14, modelled): each fused variant's speed-up over "
             + " and ".join(f"{ref} (goal {GOAL_SPEEDUPS[ref]}x)" for ref in refs)
             + f", and its MFU (goal {GOAL_MFU:.0%} of the dense bf16 peak). Where a goal is not met: the step "
             "time that meets all three (the binding goal named), the time to cut, and the categories standing in "
             "the way, each with its modelled time above its ideal (matmul/attention FLOPs at the dense peak, the "
             "rest free), largest first, until they cover the cut; then each of them as modelled ms / floor ms "
             "(the time it cannot go below; below the table: why, and what would move it).", "",
             "| variant | " + " | ".join(f"vs {ref} (goal {GOAL_SPEEDUPS[ref]}x)" for ref in refs)
             + f" | MFU (goal {GOAL_MFU:.0%}) | goal met | goal step ms (binding) | to cut ms | standing in the way "
             "(ms above ideal) | modelled ms / floor ms |",
             "|---|" + "---|" * len(refs) + "---|---|---|---|---|---|"]
    named = []
    for row in rows:
        way = ", ".join(f"{w['category']} {_ms(w['above_ideal_s'])}" for w in row["in_the_way"])
        if row["in_the_way"] and row["ideal_step_s"] > row["goal_step_s"]:
            way += (f"; even the ideal step ({_ms(row['ideal_step_s'])} ms: executed FLOPs with padding and "
                    "recompute at the peak) misses the goal")
        floors = "; ".join(f"{w['category']} {_ms(w['modelled_s'])} / {_ms(w['floor_s'])} ({w['note']})"
                           for w in row["in_the_way"] if "floor_s" in w)
        named += [w["category"] for w in row["in_the_way"] if w["category"] not in named]
        lines.append(f"| {row['variant']} | "
                     + " | ".join(f"{row['speedups'][ref]:.2f}x" if ref in row["speedups"] else "-" for ref in refs)
                     + f" | {100 * row['mfu']:.1f}% | {'yes' if row['met'] else 'no'} | "
                     f"{_ms(row['goal_step_s'])} ({row['binding']}) | {_ms(row['to_cut_s'])} | {way or '-'} | "
                     f"{floors or '-'} |")
    legend = floor_legend()
    if named:
        lines += ["", "Floors:", ""] + [f"- {c}: {legend[c]}" for c in (*CATEGORIES, "host") if c in named]
    budgets = [row for row in rows if row.get("budget")]
    return lines + (["", *budget_table(budgets, named)] if budgets else [])


_BOUNDARY_FLOOR = (
    "the bytes that cuBLAS forces on the memory-bound ops beside it (gemm_boundary_bytes): in each step phase each "
    "GEMM output they use read once, each GEMM input they produce written once (tensors an attention kernel touches, "
    "and the reads of ops whose outputs only the optimizer reads, left out: those kernels could take the work). Not "
    "derived: the rest of their bytes (the fp32 residual stream, tensors saved for the backward, partial sums), which "
    "fusing neighbouring memory-bound kernels, recomputing, or moving work into the optimizer's or an attention "
    "kernel could remove; a cuBLASLt epilogue (bias, GELU) or a GEMM kernel of ours moves the floor itself. "
    "Launches are in no floor.")


def _budget_row(row: dict) -> str:
    b = row["budget"]
    rest = f"{_ms(b['budget_s'])} / {_ms(b['rest_s'])} / {_ms(b['floor_s'])}"
    if b["floor_s"] > b["budget_s"]:
        rest += " (floors above the budget: out of reach at the modelled GEMM rate)"
    cells = "; ".join(f"{c['category']} {_ms(c['modelled_s'])} / {_ms(c['floor_s'])} ({c['note']})"
                      for c in b["categories"])
    needed = b["gemm_efficiency_needed"]
    needed = "none: missed with GEMMs at no time" if needed is None else f"{needed:.0%}"
    return (f"| {row['variant']} | {_ms(row['goal_step_s'])} | {_ms(b['held_s'])} | {rest} | {cells} | "
            f"{needed} ({b['gemm_efficiency']:.0%}) |")


def budget_table(rows: list[dict], named: list[str] = ()) -> list[str]:
    """goal_table's second part: each goal_budget, for the variants that miss a goal; below it the floors'
    legend (the optimizer's and the host's unless goal_table's legend, `named`, has them)."""
    legend = floor_legend()
    return (["Budget at the modelled rates, for each variant that misses a goal: its GEMMs (SiT's and the encoder's) "
             "and attention held at their modelled time, as only a faster GEMM or attention kernel moves them (under "
             "issue 14's rules a GEMM kernel of ours is opt-in until a GPU shows it at least as fast as cuBLAS); the "
             "time left for everything else to meet the goal step, against what everything else takes now and the "
             "sum of its floors; then each category of it as modelled ms / floor ms; last, the GEMM efficiency (of "
             "the dense bf16 peak) at which the step meets the goal with everything else as modelled.", "",
             "| variant | goal step ms | held ms (GEMMs + attention) | rest: budget ms / now ms / floors ms | "
             "rest by category: modelled ms / floor ms | GEMM efficiency needed (modelled) |",
             "|---|---|---|---|---|---|"]
            + [_budget_row(row) for row in rows] + ["", "Floors of the rest:", ""]
            + [f"- {c}: {legend[c]}" for c in ("optimizer", "host") if c not in named]
            + [f"- the other categories (the encoder's memory-bound ops included): {_BOUNDARY_FLOOR}"])


# ----------------------------------------------------------------------------------------------
# Beyond one GPU: ZeRO-1/2/3
# ----------------------------------------------------------------------------------------------

def collective_seconds(nbytes: float, gpus: int, nvlink_bytes_per_s: float) -> float:
    """A ring reduce-scatter or all-gather of an `nbytes` buffer over `gpus`: inside a node each GPU
    sends (g-1)/g of it over NVLink (half the datasheet's two-way figure each way); across nodes
    hierarchically, the node-level step on the 1/g shard over each GPU's own 400 Gb/s InfiniBand link."""
    if gpus <= 1:
        return 0.0
    g = min(gpus, GPUS_PER_NODE)
    nodes = gpus // g
    seconds = (g - 1) / g * nbytes / (nvlink_bytes_per_s / 2)
    if nodes > 1:
        seconds += (nodes - 1) / nodes * (nbytes / g) / IB_BYTES_PER_S
    return seconds


def zero_projection(summary: dict, params: int, linear_params: int, precision: str, gpus: int, stage: int,
                    nvlink_bytes_per_s: float, overlap: bool, micro_batch: int, bandwidth: float | None = None) -> dict:
    """Per-GPU step of data-parallel training on `gpus` under ZeRO `stage`, from one GPU's modelled
    step at `micro_batch`. Stages 1-2 as DeepSpeed 0.19 runs them under the trainer's configs
    (use_multi_rank_bucket_allreduce, its default; tests/test_bench_model_deepspeed.py sees it on two
    ranks): each reduce bucket is concatenated (its slices span partitions) and all-reduced whole, then
    each rank keeps its partition, and the updated parameters are all-gathered: a ring all-reduce moves
    twice a reduce-scatter, so 2 x gradients + 1 x parameters, not the 2 x params of ZeRO paper sec.
    7.2.1. Stage 3 as documented (sec. 7.2.2): all-gathers the parameters in the forward and again in the
    backward and reduce-scatters the gradients (3 x params). Gradient bytes: bf16 (bf16 mode; under
    bf16-mixed DeepSpeed reduces exact nn.Linear/Conv modules' gradients in bf16, the rest fp32);
    parameter bytes: the weights' dtype. Each rank runs 1/gpus of the optimizer phase (the step's
    passes over its partition), the whole backward phase (the bucket copies and division included) and,
    stages 1-2 with `bandwidth`, the buckets' concatenation (read + write of the flat gradient). With
    overlap the gradient reduction (and stage 3's backward all-gather) hides under the backward and stage
    3's forward all-gather under the forward; stages 1-2 all-gather after the step, exposed. Contention of
    communication with compute for memory bandwidth and SMs is not modelled."""
    grad_bytes = 2 * params if precision == "bf16" else 2 * linear_params + 4 * (params - linear_params)
    param_bytes = (2 if precision == "bf16" else 4) * params
    reduce_scatter = collective_seconds(grad_bytes, gpus, nvlink_bytes_per_s)
    gather = collective_seconds(param_bytes, gpus, nvlink_bytes_per_s)
    phases = summary["phases"]
    forward = phases.get("encoder", 0) + phases.get("forward", 0) + phases.get("loss", 0)
    backward = phases.get("backward", 0)
    optimizer = phases.get("optimizer", 0) / gpus
    compute = forward + backward + optimizer
    if stage == 3:
        volume = grad_bytes + 2 * param_bytes
        comm = reduce_scatter + 2 * gather
        exposed = (max(0.0, gather - forward) + max(0.0, reduce_scatter + gather - backward)) if overlap else comm
    else:
        volume = 2 * grad_bytes + param_bytes
        all_reduce = 2 * reduce_scatter  # a ring all-reduce: a reduce-scatter, then an all-gather
        comm = all_reduce + gather
        exposed = (max(0.0, all_reduce - backward) + gather) if overlap else comm
        if gpus > 1 and bandwidth:
            compute += 2 * param_bytes / bandwidth  # the buckets concatenated before their all-reduce
    step = compute + exposed
    return {"gpus": gpus, "stage": stage, "overlap": overlap, "micro_batch": micro_batch,
            "step_s": step, "img_per_s_per_gpu": micro_batch / step, "img_per_s": gpus * micro_batch / step,
            "comm_s": comm, "exposed_comm_s": exposed, "comm_share": exposed / step, "comm_bytes": volume}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def assumptions(ceilings: dict, precision: str, launch_s: float) -> list[str]:
    return [
        "modelled, not measured: counts from a trace on fake tensors on the CPU, time from the formula below",
        "time per op = max(FLOPs / matmul rate, bytes / bandwidth) + launches x launch cost",
        f"device {ceilings['device']} ({ceilings['source']})",
        f"bf16 matmul rate {ceilings['bf16'] / 1e12:.0f} TFLOP/s ({ceilings['bf16_from']}); fp32 matmuls at the "
        f"TF32 rate; attention at {ATTENTION_EFFICIENCY:.0%} of the bf16 peak",
        f"bandwidth {ceilings['bandwidth'] / 1e12:.2f} TB/s ({ceilings['bandwidth_from']})",
        f"launch cost {launch_s * 1e6:.0f} us per kernel",
        "two lanes per phase of bench.train_step's breakdown (encoder, fwd+loss, backward, optimizer): the device "
        "lane (the ops' times above, summed) and the host lane (the calls the host makes, each at its kind's cost); "
        "a phase takes the longer of the two (the host enqueues ahead of the GPU and the two overlap fully inside "
        "a phase; no host sync, no backlog carried into the next phase); the step is the sum of its phases",
        "host cost per call (" + HOST_COSTS_SOURCE + "; the same host CPU assumed for every preset): "
        + "; ".join(f"{kind} {HOST_COSTS[kind] * 1e6:.1f} us ({HOST_KINDS[kind]}"
                    + (f"; {HOST_PRIORS[kind][1]}" if kind in HOST_PRIORS else "") + ")" for kind in HOST_KINDS),
        f"*-graphs variants (torch.compile mode reduce-overhead, train.cuda_graphs): each run of compiled ops of "
        f"one phase (the fused encoder's forward, SiT's forward, its backward) is one CUDA graph: one launch "
        f"({launch_s * 1e6:.0f} us) per graph, {GRAPH_NODE_S * 1e6:.0f} us per kernel inside it (assumed: the "
        f"device-side gap between graph nodes); losses, clipping and AdamW stay eager",
        "bytes: each kernel reads each distinct input and writes each output once (a lower bound: no re-reads, "
        "no L2 reuse across kernels either); Triton launches touch each tensor argument once, scratch included",
        "FLOPs: matmuls and attention only (everything else memory-bound); FlashAttention-2 (flash SDPA) pads "
        "head dim 72 to 96 and recomputes in a 5-GEMM backward; our attention tiles 72 as 64 + 16, 2 GEMMs "
        "forward, 4 + 3 backward",
        "compiled variants: inside SiT's forward and backward every maximal run of pointwise/reduction/copy ops "
        "between matmuls, attention and Triton kernels is one Inductor kernel reading its external inputs and "
        "writing the outputs read later; so in the fused encoder's forward (compiled as the trainer compiles it "
        "under train.compile on a GPU); the reference encoder, losses and optimizer stay eager",
        "encoder: the reference variants run REPA's path (fp32 weights cast by autocast on every call, SDPA); the "
        "others the fused one (Linear/Conv weights cast to bf16 once, attention on kernels.attention_qkv)",
        f"precision {precision}: " + ("fp32 weights, bf16 autocast (traced with CPU autocast, whose op lists "
                                      "follow CUDA's for matmuls/convolutions), fused AdamW" if precision == "bf16-mixed"
                                      else "bf16 weights and gradients under DeepSpeed ZeRO-1/2's bf16 mode"),
        "trainer-* rows at ZeRO-2 (and --precision bf16): DeepSpeed ZeRO-2's passes as one rank runs them (bench.model."
        "_ZeroOptimizer; tests/test_bench_model_deepspeed.py checks them op for op against DeepSpeed 0.19 on the "
        "CPU): in the backward each gradient copied into a reduce bucket and each bucket divided by the world "
        "size (bf16-mixed: Linear/Conv buckets cast to bf16 for the all-reduce and copied back twice); in the "
        "step the copy into the partition, the overflow check (bf16 with bf16.check_grad_overflow, off in the "
        "trainer's generated JSON with optim.fused_clip: amax and amin per gradient), the norm (an "
        "fp64 cast and a vector_norm per gradient), the flat concatenation and its fp32 cast, fused AdamW on "
        "the fp32 master, the master copied into the weights, the trainer's EMA lerp; collectives not traced "
        "(none at one GPU; the ZeRO projection models them)",
        "trainer-bf16-mixed-zero0 (train.zero_stage 0): DeepSpeed's engine without ZeRO as one rank runs it "
        "(bench.model._StageZeroEngine, checked the same way): alignflow-bf16-copies' step (ClippedAdamW's own norm "
        "of the full fp32 gradients, fused AdamW over the fp32 weights writing their bf16 copies) and the "
        "trainer's EMA lerp over the fp32 weights; no gradient hook, bucket or flat buffer, and no gradient "
        "all-reduce (the trainer skips DeepSpeed's, the identity on one rank, which would flatten every gradient "
        "into buckets and copy it back: 16 bytes a parameter more in the backward); "
        "trainer-bf16-mixed-zero0-graphs-all: the same with train.compile, train.cuda_graphs and "
        "optim.step_kernel alignflow, so train.bf16_weight_grads 'auto' on (alignflow-graphs-all's step and the "
        "EMA lerp)",
        "clip_grad_norm_ and AdamW run their multi-tensor (foreach / fused) CUDA paths; launches as CUDA's "
        "multi_tensor_apply chunks them",
        "optimizer clipping: reference-* and alignflow-separate-clip run clip_grad_norm_ (a norm pass, then an "
        "in-place scaling pass) before fused AdamW; alignflow, alignflow-compiled and the trainer-* rows "
        "(optim.fused_clip, on on a GPU) take the norm in one pass and fused AdamW divides by the clip factor "
        "as it reads each gradient (torch's grad_scale, which writes the divided gradient back: 4 bytes a "
        "parameter); alignflow-adamw-kernel and alignflow-graphs-all(-fp32-grads) (optim.step_kernel alignflow) "
        "step with csrc/adamw.cu instead: it divides as it reads and writes no gradient back, and writes the bf16 "
        "weight copies in the same pass (one launch per call, its chunk tables cached on the device: no copy); "
        "alignflow-graphs-all (train.bf16_weight_grads) keeps the Linear/Conv weight and bias gradients in bf16 on "
        "the copies: no cast of them to fp32 in the backward, the norm (fp32 sums) and the kernel read 2 bytes a "
        "parameter instead of 4; the "
        "trainer-* rows at ZeRO-2 (and --precision bf16) model DeepSpeed's clipping: its norm of the "
        "gradients and, without fused_clip, its in-place scaling of the flat fp32 gradient",
        "MFU: the analytic model FLOPs (SiT.flops_per_sample x 3 + the encoder's forward, bench/flops.py) over "
        "the datasheet bf16 peak; Amdahl: the step if every op inside a `kernels` op (the fused kernels, or the "
        "reference paths they replace) took no time; ideal: matmul and attention FLOPs at the datasheet peak, "
        "everything else free",
    ]


def _ms(s):
    return f"{1e3 * s:.1f}"


def markdown(payload: dict, top_ops: bool = True, zero: bool = True) -> str:
    cfg, variants = payload["config"], payload["variants"]
    lines = [f"**Modelled, not measured.** {cfg['model']} + REPA ({cfg['encoder']}) batch {cfg['batch']} at "
             f"{cfg['resolution']} px, {cfg['precision']} (trainer-* rows: their own train.precision), on a "
             f"modelled {payload['device']['device']} "
             f"(`python -m bench.model`, {payload['date']}).", "",
             "| variant | step ms | img/s | MFU | GB moved | launches | in CUDA graphs | Amdahl bound ms | ideal ms | "
             + " | ".join(CATEGORIES) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(CATEGORIES)]
    for name, v in variants.items():
        lines.append(f"| {name} | {_ms(v['step_s'])} | {v['img_per_s']:.0f} | {100 * v['mfu']:.1f}% | "
                     f"{v['bytes'] / 1e9:.1f} | {v['launches']} | {v.get('graph_launches', 0)} | "
                     f"{_ms(v['amdahl_step_s'])} | {_ms(v['ideal_step_s'])} | "
                     + " | ".join(_ms(v["categories"][c]) for c in CATEGORIES) + " |")
    if any("phase_seconds" in v for v in variants.values()):
        lines += ["", "Lanes per phase (ms): device lane / host lane, and the lane that bounds the phase (the phase "
                      "takes the longer; host costs " + HOST_COSTS_SOURCE + ").", "",
                  "| variant | step ms | device lane ms | host lane ms | "
                  + " | ".join({"forward": "fwd+loss"}.get(sp, sp) for sp in STEP_PHASES) + " |",
                  "|---|---|---|---|" + "---|" * len(STEP_PHASES)]
        for name, v in variants.items():
            if "phase_seconds" not in v:
                continue
            cells = [f"{_ms(v['breakdown_seconds'].get(sp, 0.0))} / {_ms(v['host_seconds'][sp])} {v['bound_by'][sp]}"
                     for sp in STEP_PHASES]
            lines.append(f"| {name} | {_ms(v['step_s'])} | {_ms(v['device_step_s'])} | "
                         f"{_ms(sum(v['host_seconds'].values()))} | " + " | ".join(cells) + " |")
    lines += ["", "Sensitivity of the device lane (ms): launch cost 0 / 2 / 4 / 6 us; matmul at 60 / 80 / 100% of "
                  "peak.", "",
              "| variant | 0 us | 2 us | 4 us | 6 us | 60% | 80% | 100% |", "|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        s = v["sensitivity_step_s"]
        lines.append(f"| {name} | " + " | ".join(_ms(x) for x in s["launch_us"].values()) + " | "
                     + " | ".join(_ms(x) for x in s["matmul_of_peak"].values()) + " |")
    if payload.get("goal"):
        lines += [""] + goal_table(payload["goal"])
    for name, v in variants.items() if top_ops else ():
        lines += ["", f"Top ops, {name}:", "", "| phase | category | op | calls | ms | GB | GFLOP | launches |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in v["top_ops"][:8]:
            lines.append(f"| {r['phase']} | {r['category']} | `{r['op']}` | {r['calls']} | {_ms(r['seconds'])} | "
                         f"{r['bytes'] / 1e9:.2f} | {r['flops'] / 1e9:.0f} | {r['launches']} |")
    if zero and payload.get("zero"):
        lines += ["", zero_table(payload)]
    lines += ["", "Assumptions:", ""] + [f"- {a}" for a in payload["assumptions"]]
    return "\n".join(lines) + "\n"


def zero_table(payload: dict) -> str:
    zero = payload["zero"]
    lines = [f"**Modelled, not measured.** Data-parallel {payload['config']['model']} at global batch "
             f"{zero['global_batch']}, the {zero['variant']} step ({zero['precision']}), per-GPU compute from the "
             f"one-GPU model above; NVLink {zero['nvlink_gb_per_s']:.0f} GB/s per GPU (two ways) in a node of "
             f"{GPUS_PER_NODE}, {IB_BYTES_PER_S * 8 / 1e9:.0f} Gb/s InfiniBand per GPU between nodes.", "",
             "| GPUs | micro-batch | ZeRO | overlap | step ms | img/s per GPU | img/s | comm GB | exposed comm ms | comm share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in zero["rows"]:
        lines.append(f"| {r['gpus']} | {r['micro_batch']} | {r['stage']} | {'yes' if r['overlap'] else 'no'} | "
                     f"{_ms(r['step_s'])} | {r['img_per_s_per_gpu']:.0f} | {r['img_per_s']:.0f} | "
                     f"{r['comm_bytes'] / 1e9:.2f} | {_ms(r['exposed_comm_s'])} | {100 * r['comm_share']:.0f}% |")
    lines += ["", "ZeRO volumes per step: stages 1-2 as DeepSpeed 0.19 runs them (use_multi_rank_bucket_allreduce, "
              "its default: each reduce bucket concatenated and all-reduced whole, then the updated parameters "
              "all-gathered: 2 x gradients + 1 x parameters, more than the ZeRO paper's reduce-scatter, sec. 7.2.1), "
              "stage 3 as documented (sec. 7.2.2: the parameters all-gathered twice, forward and backward, the "
              "gradients reduce-scattered: 3 x params); gradients in bf16 for exact nn.Linear/Conv modules "
              "(DeepSpeed's torch_autocast) and fp32 otherwise under bf16-mixed, parameters in their dtype; ring "
              "collectives at the link rate (NCCL's efficiency below it is not modelled), hierarchical across "
              "nodes (NVLink inside, then the 1/8 shard over each GPU's own InfiniBand link); the optimizer phase "
              "is sharded (1/N per GPU), the backward's bucket passes are not, and stages 1-2 add the buckets' "
              "concatenation; with overlap the gradient reduction hides under the backward and stage 3's forward "
              "all-gather under the forward, while stages 1-2's parameter all-gather after the step stays "
              "exposed; communication/compute contention and stage 3's per-module gather latency are not "
              "modelled; the per-GPU compute is the device lane's (the host lane is not projected)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def model_step(args_dict: dict, variants=VARIANTS, ceilings=None, launch_s=LAUNCH_S, traces=None,
               host_costs: dict | None = None) -> dict:
    """Trace (once per backend) and model each variant; returns {variant: summary} and the traces."""
    traces = {} if traces is None else traces
    out = {}
    for name in variants:
        base, overrides = OPT_IN_VARIANTS.get(name, (name, {}))
        step_kernel = "alignflow" if base in ADAMW_KERNEL_VARIANTS else "torch"
        kernel_key = "+adamw-kernel" if step_kernel != "torch" else ""
        if name in TRAINER_VARIANTS:
            precision, stage = TRAINER_VARIANTS[name][0], TRAINER_ZERO_STAGES.get(name, 2)
            key = f"trainer-{precision}" + (f"-zero{stage}" if stage != 2 else "") + kernel_key
            if key not in traces:  # the trainer's optim.fused_clip 'auto': on on a GPU
                traces[key] = trace_step(backend="triton", trainer=True, fused_clip=True, zero_stage=stage,
                                         step_kernel=step_kernel, **dict(args_dict, precision=precision))
            compiled = TRAINER_VARIANTS[name][1]
        else:
            backend, compiled = BENCH_VARIANTS[base]  # (kernels backend, torch.compile), as bench.train_step runs it
            fused_clip, bf16_copies = base in FUSED_CLIP_VARIANTS, base in BF16_COPIES_VARIANTS
            bf16_grads = base in BF16_GRADS_VARIANTS
            key = (backend + ("+fused-clip" if fused_clip else "") + ("+bf16-copies" if bf16_copies else "")
                   + kernel_key + ("+bf16-grads" if bf16_grads else "")
                   + "".join(f"+{k}={v}" for k, v in overrides.items()))
            if key not in traces:
                traces[key] = trace_step(backend=backend, fused_clip=fused_clip, bf16_copies=bf16_copies,
                                         model_config=overrides, step_kernel=step_kernel, bf16_grads=bf16_grads,
                                         **args_dict)
        trace = traces[key]
        ops = fuse_compiled(trace["ops"]) if compiled else trace["ops"]
        if compiled == "reduce-overhead":
            ops = capture_graphs(ops)
        counts = count_host(trace["host"], ops, bool(compiled))
        out[name] = summarize(ops, ceilings, args_dict["batch"], trace["model_flops"], launch_s, host_counts=counts,
                              host_costs=host_costs)
        trainer = name in TRAINER_VARIANTS
        out[name].update(params=trace["params"], optimizer_floor_ema=trainer,
                         optimizer_floor_bytes_per_param=optimizer_floor_bytes(trainer))
    return out, traces


def baseline_counts(ops: list[Op]) -> dict:
    """Bytes and launches per (phase, category, op) of a trace: what the regression guard compares."""
    counts = defaultdict(lambda: {"bytes": 0.0, "launches": 0})
    for op in ops:
        c = counts[f"{op.phase} | {op.category} | {op.name}"]
        c["bytes"] += op.bytes
        c["launches"] += op.launches
    return dict(sorted(counts.items()))


SMOKE_CONFIG = dict(model="SiT-S/2", batch=2, encoder="dinov2-vit-s",
                    model_overrides=dict(hidden_size=64, depth=2, num_heads=2))
BASELINE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model-baseline.json")
BASELINE_CONFIG = dict(model="SiT-XL/2", batch=32, resolution=256, encoder="dinov2-vit-b", precision="bf16-mixed",
                       fused_clip=True)  # the alignflow variant's optimizer (bench.train_step.FUSED_CLIP_VARIANTS)


def baseline_environment() -> dict:
    """What the traced counts depend on besides the code: another torch (its decompositions) or Triton
    may count differently, so the exact comparison holds only under the recorded versions."""
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def compare_exactly(ops: list[Op], baseline: dict) -> list[str]:
    """Every (phase, category, op) whose bytes or launches differ from the baseline's, as
    'key: bytes A -> B, launches C -> D' (empty when identical): a pure refactor moves none."""
    counts, recorded = baseline_counts(ops), baseline["ops"]
    missing = {"bytes": 0, "launches": 0}
    moved = []
    for key in sorted(set(counts) | set(recorded)):
        now, then = counts.get(key, missing), recorded.get(key, missing)
        if now != then:
            moved.append(f"{key}: bytes {then['bytes']:.0f} -> {now['bytes']:.0f}, "
                         f"launches {then['launches']} -> {now['launches']}")
    return moved


def write_baseline(path: str = BASELINE_PATH) -> str:
    ops = trace_step(backend="triton", **BASELINE_CONFIG)["ops"]
    counts = baseline_counts(ops)
    payload = {"what": "counted bytes and launches of the alignflow (fused, eager) training step; "
                       "tests/test_bench_model.py fails when either grows by more than 2%, or when any op's "
                       "count differs at all under the recorded environment (the proof of a pure refactor)",
               "config": BASELINE_CONFIG, "environment": baseline_environment(),
               "bytes": sum(c["bytes"] for c in counts.values()),
               "launches": sum(c["launches"] for c in counts.values()), "ops": counts}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def compare_to_baseline(ops: list[Op], baseline: dict, tolerance: float = 0.02) -> list[str]:
    """The complaints (empty when neither total grew by more than `tolerance`), naming the ops that grew."""
    counts = baseline_counts(ops)
    problems = []
    for what in ("bytes", "launches"):
        total = sum(c[what] for c in counts.values())
        if total > baseline[what] * (1 + tolerance):
            grown = sorted(((k, c[what] - baseline["ops"].get(k, {}).get(what, 0)) for k, c in counts.items()),
                           key=lambda kv: -kv[1])
            named = ", ".join(f"{k} +{v:.3g}" for k, v in grown if v > 0)[:1500]
            problems.append(f"the fused step's {what} grew {total / baseline[what] - 1:+.1%} over the baseline "
                            f"({baseline[what]:.4g} -> {total:.4g}); ops that grew: {named}. If intended, run "
                            f"`python -m bench.model --write-baseline` and commit bench/results/model-baseline.json "
                            f"in the same commit, saying why it grew")
    return problems


def prediction_for(results_dir: str, step_payload: dict | None) -> dict | None:
    """bench.model's newest result (`model_payloads`) for the device preset of the measured
    `step_payload` (bench.predict writes it beside the measurement), or None."""
    if step_payload is None:
        return None
    preset = preset_for(step_payload["environment"]["device"])
    return next((p for p in model_payloads(results_dir) if p["device_preset"] == preset), None)


def host_fit_from(results_dir: str) -> tuple[dict, dict, dict]:
    """(fit, measured step payload, model payload): fit_host_costs over the newest train_step-*.json in
    `results_dir` and the newest bench.model result of its device preset there."""
    step = newest(results_dir, "train_step")
    prediction = prediction_for(results_dir, step)
    if step is None or prediction is None:
        raise SystemExit(f"--fit-host: needs a train_step-*.json and the bench.model result of its device in "
                         f"{results_dir} (`python -m bench.predict {results_dir}`)")
    return fit_host_costs(host_fit_rows(step, prediction)), step, prediction


def print_host_fit(results_dir: str) -> int:
    fit, step, prediction = host_fit_from(results_dir)
    print(f"host costs fitted to {os.path.basename(step['_path'])} with the counts of "
          f"{os.path.basename(prediction['_path'])} (fitted: {', '.join(fit['fitted'])}):")
    for kind, cost in fit["costs"].items():
        print(f"  {kind}: {cost * 1e6:.2f} us{'' if kind in fit['fitted'] else ' (not fitted)'}")
    print("| variant | phase | measured ms | device ms | host ms | composed ms | error before | error after | in fit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in fit["rows"]:
        print(f"| {r['variant']} | {r['phase']} | {_ms(r['measured_s'])} | {_ms(r['device_s'])} | {_ms(r['host_s'])} | "
              f"{_ms(r['composed_s'])} | {100 * r['device_error']:+.0f}% | {100 * r['error']:+.0f}% | "
              f"{'yes' if r['in_fit'] else 'no'} |")
    print(f"rms relative error over the phases: {100 * fit['rms_error']:.1f}%")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device-preset", default="h100-sxm",
                        help=f"one of {sorted(PRESETS)}, several comma-separated, or 'all' (traced once for all)")
    parser.add_argument("--launch-us", type=float, default=LAUNCH_S * 1e6)
    parser.add_argument("--zero-gpus", default="8,64", help="GPU counts of the ZeRO projection ('' for none)")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--results", default="bench/results", help="where measured ceilings are looked up")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--write-baseline", action="store_true", help="rewrite bench/results/model-baseline.json")
    parser.add_argument("--fit-host", action="store_true",
                        help="fit the host lane's costs to the newest measured step in --results and the model's "
                             "host counts beside it (print only: HOST_COSTS holds the constants)")
    parser.add_argument("--smoke", action="store_true", help="a narrow 2-block SiT at batch 2 (CI keeps the tool "
                                                             "working; its figures mean nothing)")
    args = parser.parse_args(argv)
    if args.write_baseline:
        print(f"wrote {write_baseline()}")
        return 0
    if args.fit_host:
        return print_host_fit(args.results)
    presets = sorted(PRESETS) if args.device_preset == "all" else [p for p in args.device_preset.split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown or not presets:
        parser.error(f"--device-preset: unknown {unknown or args.device_preset!r}; allowed: {sorted(PRESETS)} or all")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS) - set(OPT_IN_VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {list(VARIANTS) + list(OPT_IN_VARIANTS)}")
    try:
        gpu_counts = [int(g) for g in args.zero_gpus.split(",") if g]
    except ValueError:
        parser.error(f"--zero-gpus {args.zero_gpus!r}: allowed a comma-separated list of GPU counts")
    for g in gpu_counts:
        if g < 1 or args.global_batch % g or (g > GPUS_PER_NODE and g % GPUS_PER_NODE):
            parser.error(f"--zero-gpus {g}: must divide --global-batch {args.global_batch} and be a multiple of "
                         f"{GPUS_PER_NODE} above one node")
    config = dict(model=args.model, batch=args.batch, resolution=args.resolution, encoder=args.encoder,
                  encoder_depth=args.encoder_depth, reg=args.reg, car_flow=args.car_flow, precision=args.precision)
    if args.smoke:
        config.update(SMOKE_CONFIG)
    traces = defaultdict(dict)  # batch -> backend -> trace: each traced once for every preset
    for preset in presets:
        payload = model_payload(preset, config, variants, gpu_counts, args, traces)
        print(markdown(payload))
        if not args.no_write:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, f"model-{preset}-{payload['date']}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(payload, f, indent=1)
            os.replace(path + ".tmp", path)
            print(f"wrote {path}")
    return 0


def model_payload(preset, config, variants, gpu_counts, args, traces) -> dict:
    """The result of one device preset: every variant, the ZeRO projection, the assumptions."""
    import triton

    ceilings = device_ceilings(preset, args.results)
    launch_s = args.launch_us * 1e-6
    batch = config["batch"]
    results, _ = model_step(config, variants, ceilings, launch_s, traces[batch])
    trace = next(iter(traces[batch].values()))
    date = datetime.date.today().isoformat()
    payload = {"kind": "model", "date": date, "device_preset": preset,
               "environment": {"device": f"modelled {ceilings['device']}", "date": date, "torch": torch.__version__,
                               "triton": triton.__version__},
               "device": ceilings, "config": config, "variants": results,
               "analytic": {k: trace[k] for k in ("model_flops", "sit_flops_per_sample", "encoder_flops_per_image",
                                                  "params")},
               "host_costs": HOST_COSTS, "host_costs_source": HOST_COSTS_SOURCE,
               "assumptions": assumptions(ceilings, config["precision"], launch_s),
               "goal": goal_check(results, ceilings["peak_bf16"], ceilings["bandwidth"])}
    if gpu_counts:
        # the trainer's step is what runs data-parallel under ZeRO; else the fused step
        variant = next((v for v in ("trainer-bf16", "alignflow") if v in results), variants[0])
        precision = TRAINER_VARIANTS[variant][0] if variant in TRAINER_VARIANTS else config["precision"]
        nvlink = PRESETS[preset].nvlink_bytes_per_s
        rows = []
        for g in gpu_counts:
            micro = args.global_batch // g
            summary = results[variant] if micro == batch else model_step(
                dict(config, batch=micro), [variant], ceilings, launch_s, traces[micro])[0][variant]
            for stage in (1, 2, 3):
                for overlap in (False, True):
                    rows.append(zero_projection(summary, trace["params"], trace["linear_params"], precision,
                                                g, stage, nvlink, overlap, micro, ceilings["bandwidth"]))
        payload["zero"] = {"variant": variant, "precision": precision, "global_batch": args.global_batch,
                           "nvlink_gb_per_s": nvlink / 1e9, "rows": rows}
    return payload

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
