"""Benchmark cases for kernels.gelu_tanh: SiT's MLP GELU(tanh) with fc1's bias gradient in the backward.

Variants: torch's ops as nn.Linear + F.gelu run them (F.gelu forward, gelu_backward, then the bias
gradient summed over dL/da in a pass of its own: kernels.reference_gelu_tanh; the reference of the
ratios), the same under torch.compile (Inductor fuses the sum into the GELU backward), and the Triton
backward kernel. The input `a` is fc1's output (B*N, 4 D); fc1's matmuls are cuBLAS's in every variant
and not timed here.

bytes moved, E = B*N*4D elements of size s: forward a, g (2 E s); forward+backward + a, dL/dg, dL/da
(5 E s) and the fp32 bias gradient (4 x 4D). The kernel's fp32 per-tile partial sums are not counted
(overhead, see kernels.gelu._tiles).
"""
import torch

import kernels
from bench.common import BenchCase, Variant, compiled, forward_only


def _triton_reason(device):
    if device.type == "cuda" or kernels.interpreting():
        return None
    return "Triton needs CUDA or TRITON_INTERPRET=1"


def _shape_cases(device, M, N, dtype, smoke, label, headline=False):
    E, s = M * N, torch.finfo(dtype).bits // 8
    a = (2 * torch.randn(M, N, device=device, dtype=dtype)).requires_grad_()
    bias = torch.zeros(N, device=device, dtype=torch.float32, requires_grad=True)  # fp32, as under bf16-mixed
    dg = torch.randn_like(a)

    def reference():
        with kernels.use_backend("torch"):
            return kernels.gelu_tanh(a, bias)

    def ours():
        with kernels.use_backend("triton"):
            return kernels.gelu_tanh(a, bias)

    def forward_backward(fn):
        return lambda: (lambda: torch.autograd.grad(fn(), [a, bias], dg))

    reference_compiled, compile_reason = compiled(reference, smoke)
    variants = (("eager (nn.Linear + F.gelu)", reference, None),
                ("eager compiled", reference_compiled, compile_reason),
                ("triton", ours, _triton_reason(device)))
    return [BenchCase(
        "gelu_tanh", f"{M}x{N} {str(dtype)[6:]} {label}",
        forward=[Variant(name, forward_only(fn), reason) for name, fn, reason in variants],
        forward_backward=[Variant(name, forward_backward(fn), reason) for name, fn, reason in variants],
        bytes_forward=2 * E * s, bytes_forward_backward=5 * E * s + 4 * N,
        notes="fc1 output a (B*N, 4D); backward gives dL/da and fc1's bias gradient", headline=headline)]


def cases(device, smoke):
    if smoke:
        return _shape_cases(device, 40, 72, torch.float32, smoke, "smoke")
    return (_shape_cases(device, 32 * 256, 4 * 1152, torch.bfloat16, smoke, "SiT-XL/2 256px", headline=True)
            + _shape_cases(device, 32 * 256, 4 * 768, torch.bfloat16, smoke, "SiT-B/2 256px"))
