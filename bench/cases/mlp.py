"""Benchmark cases for kernels.mlp_gelu: SiT's whole MLP, fc2(GELU_tanh(fc1(x))), as one op.

Variants: torch's ops as nn.Linear + F.gelu + nn.Linear run them (kernels.reference_mlp_gelu: cuBLAS
fc1, the GELU pass, cuBLAS fc2; the reference of the ratios), the same under torch.compile (Inductor
may fuse the GELU into its own Triton matmul template or keep cuBLAS), and ours (a Triton fc1 matmul
with the GELU epilogue, a Triton dL/dg matmul with the GELU' epilogue, cuBLAS elsewhere). Ours is
opt-in (model.mlp_kernel: triton) until this case shows it at least as fast as cuBLAS on a GPU.

FLOPs: two matmuls of 2 M D H each forward, four more backward (2 M D H x 6). bytes: a lower bound
(each tensor moved once) for E = M x H elements of a and g and element size s: forward reads x, W1,
W2 and writes a, g (saved for the backward) and y; the backward reads dL/dy, x, a, g, W1, W2 and
writes dL/da (the one intermediate it needs), dL/dx, dW1, dW2 and the biases' gradients.
"""
import torch

import kernels
from bench.common import BenchCase, Variant, compiled, forward_only


def _triton_reason(device):
    if device.type == "cuda" or kernels.interpreting():
        return None
    return "Triton needs CUDA or TRITON_INTERPRET=1"


def _shape_cases(device, M, D, dtype, smoke, label, headline=False):
    H, s = 4 * D, torch.finfo(dtype).bits // 8
    x = torch.randn(M, D, device=device, dtype=dtype).requires_grad_()
    w1 = (torch.randn(H, D, device=device, dtype=dtype) * D ** -0.5).requires_grad_()
    b1 = torch.zeros(H, device=device, dtype=dtype, requires_grad=True)
    w2 = (torch.randn(D, H, device=device, dtype=dtype) * H ** -0.5).requires_grad_()
    b2 = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)
    inputs = [x, w1, b1, w2, b2]
    dy = torch.randn(M, D, device=device, dtype=dtype)

    def reference():
        with kernels.use_backend("torch"):
            return kernels.mlp_gelu(*inputs)

    def ours():
        with kernels.use_backend("triton"):
            return kernels.mlp_gelu(*inputs)

    def forward_backward(fn):
        return lambda: (lambda: torch.autograd.grad(fn(), inputs, dy))

    reference_compiled, compile_reason = compiled(reference, smoke)
    variants = (("eager (nn.Linear + F.gelu + nn.Linear)", reference, None),
                ("eager compiled", reference_compiled, compile_reason),
                ("triton", ours, _triton_reason(device)))
    E, weights = M * H, 2 * D * H
    bytes_forward = (M * D + weights + 2 * E + M * D) * s
    bytes_backward = (3 * M * D + 3 * E + 2 * weights + H + D) * s
    return [BenchCase(
        "mlp_gelu", f"{M}x{D}->{H} {str(dtype)[6:]} {label}",
        forward=[Variant(name, forward_only(fn), reason) for name, fn, reason in variants],
        forward_backward=[Variant(name, forward_backward(fn), reason) for name, fn, reason in variants],
        bytes_forward=bytes_forward, bytes_forward_backward=bytes_forward + bytes_backward,
        flops_forward=4.0 * M * D * H, flops_forward_backward=12.0 * M * D * H,
        notes="SiT's MLP; ours opt-in (model.mlp_kernel) until measured at least as fast as cuBLAS",
        headline=headline)]


def cases(device, smoke):
    if smoke:
        return _shape_cases(device, 40, 72, torch.float32, smoke, "smoke")
    return (_shape_cases(device, 32 * 256, 1152, torch.bfloat16, smoke, "SiT-XL/2 256px", headline=True)
            + _shape_cases(device, 32 * 256, 768, torch.bfloat16, smoke, "SiT-B/2 256px"))
