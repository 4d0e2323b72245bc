"""Benchmark cases for kernels.adaln_modulate and kernels.adaln_residual_modulate (SiT adaLN glue).

Variants: SiT's eager code (nn.LayerNorm without affine, `modulate`, the gated residual; the
reference of the ratios), the same under torch.compile, apex FusedLayerNorm + eager modulate where
apex is installed, the Triton kernels, and the CUDA C++ kernels (csrc/adaln.cu) where they are built. Forward runs under no_grad; forward+backward gives
gradients to x, h, gate, shift and scale for fixed random output gradients.

bytes moved: the traffic the fused op cannot avoid, with E = B*N*D activation elements, V = B*D
modulation elements (both of element size s) and 4-byte mean and rstd per token:
    modulate           forward  x, y                          2 E s +  2 V s +  8 B N
                       fwd+bwd  + x, dy, dx; scale, d_shift, d_scale; mean, rstd
                                                              5 E s +  5 V s + 16 B N
    residual_modulate  forward  x, h, x_new, y                4 E s +  3 V s +  8 B N
                       fwd+bwd  + x_new, h, dy, g_x_new, dx, dh; gate, scale, d_gate, d_shift,
                                d_scale; mean, rstd          10 E s +  8 V s + 16 B N
    residual_modulate  with the Linear's bias (D elements of size s; model.fused_bias_grad): + bias read
    + bias             in the forward and the backward, d_bias written
                                                             + 3 D s (either pass: + D s forward)
The kernel's fp32 per-tile partial sums of d_shift/d_scale/d_gate (and d_bias) are not counted (overhead,
see kernels.adaln._backward_tiles).

The bias case's reference is SiT's eager code with nn.Linear's bias (h + bias, its gradient summed over
all rows); beside it the Triton kernel with the bias inside ("triton") and the Triton kernel without it,
the bias gradient summed over dL/dh by torch as nn.Linear's backward does ("triton + torch bias sum").
"""
import torch
import torch.nn as nn

import kernels
from kernels import _cuda
from bench.common import BenchCase, Variant, compiled, forward_only
from kernels.gelu import _BiasGradient  # identity forward; backward: nn.Linear's bias sum over the rows


HEADLINE = "SiT-XL/2 256px"


def _modulate(x, shift, scale):  # as SiT / DiT write it
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _apex_norm(D, device):
    """(FusedLayerNorm or None, reason it is unavailable)."""
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        return None, "apex not installed"
    if device.type != "cuda":
        return None, "apex FusedLayerNorm needs CUDA"
    return FusedLayerNorm(D, elementwise_affine=False, eps=1e-6).to(device), None


def _triton_reason(device):
    if device.type == "cuda" or kernels.interpreting():
        return None
    return "Triton needs CUDA or TRITON_INTERPRET=1"


def _forward_backward(fn, leaves, grad_outputs):
    def run():
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, leaves, grad_outputs)
    return lambda: run


def _on_cuda(fn):
    def run():
        with kernels.use_backend("cuda"):
            return fn()
    return run


def _shape_cases(device, B, N, D, dtype, smoke, label):
    E, V, s = B * N * D, B * D, torch.finfo(dtype).bits // 8
    x, h = (torch.randn(B, N, D, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    gate, shift, scale = (0.5 * torch.randn(B, D, device=device, dtype=dtype) for _ in range(3))
    gate, shift, scale = (v.requires_grad_() for v in (gate, shift, scale))
    g_x_new, dy = torch.randn_like(x), torch.randn_like(x)
    norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6).to(device)
    apex_norm, apex_reason = _apex_norm(D, device)
    triton_reason = _triton_reason(device)
    shape = f"{B}x{N}x{D} {str(dtype)[6:]} {label}"

    def eager_modulate():
        return _modulate(norm(x), shift, scale)

    def eager_residual():
        x_new = x + gate.unsqueeze(1) * h
        return x_new, _modulate(norm(x_new), shift, scale)

    def apex_modulate():
        return _modulate(apex_norm(x), shift, scale)

    def apex_residual():
        x_new = x + gate.unsqueeze(1) * h
        return x_new, _modulate(apex_norm(x_new), shift, scale)

    def triton_modulate():
        with kernels.use_backend("triton"):
            return kernels.adaln_modulate(x, shift, scale)

    def triton_residual():
        with kernels.use_backend("triton"):
            return kernels.adaln_residual_modulate(x, h, gate, shift, scale)

    def cuda_modulate():
        with kernels.use_backend("cuda"):
            return kernels.adaln_modulate(x, shift, scale)

    def cuda_residual():
        with kernels.use_backend("cuda"):
            return kernels.adaln_residual_modulate(x, h, gate, shift, scale)

    bias = (0.5 * torch.randn(D, device=device, dtype=dtype)).requires_grad_()

    def eager_residual_bias():
        x_new = x + gate.unsqueeze(1) * (h + bias)
        return x_new, _modulate(norm(x_new), shift, scale)

    def triton_residual_bias():
        with kernels.use_backend("triton"):
            return kernels.adaln_residual_modulate(x, h, gate, shift, scale, bias=bias)

    def triton_residual_torch_bias_sum():  # h stands for the matmul output with its bias already added
        with kernels.use_backend("triton"):
            return kernels.adaln_residual_modulate(x, _BiasGradient.apply(h, bias), gate, shift, scale)

    cuda_reason = _cuda.unavailable("adaln", device)
    cases = []
    for op, impls, leaves, grad_outputs, bytes_fwd, bytes_fwd_bwd in (
            ("adaln_modulate", (eager_modulate, apex_modulate, triton_modulate, cuda_modulate), [x, shift, scale], (dy,),
             2 * E * s + 2 * V * s + 8 * B * N, 5 * E * s + 5 * V * s + 16 * B * N),
            ("adaln_residual_modulate", (eager_residual, apex_residual, triton_residual, cuda_residual),
             [x, h, gate, shift, scale], (g_x_new, dy),
             4 * E * s + 3 * V * s + 8 * B * N, 10 * E * s + 8 * V * s + 16 * B * N)):
        eager, apex, ours, cuda = impls
        eager_compiled, compile_reason = compiled(eager, smoke)
        variants = (("eager (SiT)", eager, None), ("eager compiled", eager_compiled, compile_reason),
                    ("apex FusedLayerNorm + eager", apex, apex_reason), ("triton", ours, triton_reason),
                    ("cuda C++", _cuda.launched(cuda, "adaln_forward"), cuda_reason))
        # the CUDA C++ pass runs its backward under the "cuda" backend too (it dispatches when it runs)
        cuda_pass = _cuda.launched(_cuda.launched(_on_cuda(_forward_backward(cuda, leaves, grad_outputs)()),
                                                  "adaln_forward"), "adaln_backward")
        cases.append(BenchCase(
            op, shape,
            forward=[Variant(name, forward_only(fn), reason) for name, fn, reason in variants],
            forward_backward=[Variant(name, _forward_backward(fn, leaves, grad_outputs), reason)
                              for name, fn, reason in variants[:-1]]
                             + [Variant("cuda C++", lambda: cuda_pass, cuda_reason)],
            bytes_forward=bytes_fwd, bytes_forward_backward=bytes_fwd_bwd,
            notes="bytes: unavoidable traffic of the fused op (see bench/cases/adaln.py)",
            headline=label == HEADLINE))
    bias_variants = (("eager (SiT, nn.Linear bias)", eager_residual_bias, None),
                     ("eager compiled", *compiled(eager_residual_bias, smoke)),
                     ("triton", triton_residual_bias, triton_reason),
                     ("triton + torch bias sum", triton_residual_torch_bias_sum, triton_reason))
    bias_leaves = [x, h, gate, shift, scale, bias]
    cases.append(BenchCase(
        "adaln_residual_modulate+bias", shape,
        forward=[Variant(name, forward_only(fn), reason) for name, fn, reason in bias_variants],
        forward_backward=[Variant(name, _forward_backward(fn, bias_leaves, (g_x_new, dy)), reason)
                          for name, fn, reason in bias_variants],
        bytes_forward=4 * E * s + 3 * V * s + 8 * B * N + D * s,
        bytes_forward_backward=10 * E * s + 8 * V * s + 16 * B * N + 3 * D * s,
        notes="bytes: unavoidable traffic of the fused op with the bias (see bench/cases/adaln.py)",
        headline=label == HEADLINE))
    return cases


def cases(device, smoke):
    if smoke:
        return _shape_cases(device, 2, 5, 72, torch.float32, smoke, "smoke")
    return (_shape_cases(device, 32, 256, 1152, torch.bfloat16, smoke, HEADLINE)
            + _shape_cases(device, 32, 256, 768, torch.bfloat16, smoke, "SiT-B/2 256px")
            + _shape_cases(device, 32, 1024, 1152, torch.bfloat16, smoke, "SiT-XL/2 512px"))
