"""Benchmark cases for kernels.alignment_loss (REPA projection loss): the reference eager and
compiled, the Triton kernels, the CUDA C++ kernels (csrc/alignment_loss.cu) where they are built."""
import torch

import kernels
from kernels import _cuda
from bench.common import BenchCase, Variant, backward_of, compiled, forward_only


def _shape_case(device, B, N, D, dtype, smoke, label, headline=False):
    numel, size = B * N * D, torch.finfo(dtype).bits // 8
    z_pred = torch.randn(B, N, D, device=device, dtype=dtype).requires_grad_()
    z_target = torch.randn(B, N, D, device=device, dtype=dtype)

    def ref():
        return kernels.reference_alignment_loss(z_pred, z_target)

    def ours():
        with kernels.use_backend("triton"):
            return kernels.alignment_loss(z_pred, z_target)

    def cuda():
        with kernels.use_backend("cuda"):
            return kernels.alignment_loss(z_pred, z_target)

    ref_compiled, reason = compiled(ref, smoke)
    cuda_ours, cuda_reason = _cuda.launched(cuda, "alignment_forward"), _cuda.unavailable("alignment", device)

    def cuda_pass():  # the backward under the "cuda" backend too: it dispatches when it runs
        with kernels.use_backend("cuda"):
            backward_of(cuda_ours, [z_pred])()

    cuda_pass = _cuda.launched(cuda_pass, "alignment_backward")

    return BenchCase(
        "alignment_loss", f"{B}x{N}x{D} {str(dtype)[6:]} {label}",
        forward=[Variant("reference eager", forward_only(ref)), Variant("reference compiled", forward_only(ref_compiled), reason),
                 Variant("triton", forward_only(ours)), Variant("cuda C++", forward_only(cuda_ours), cuda_reason)],
        forward_backward=[Variant("reference eager", lambda: backward_of(ref, [z_pred])),
                          Variant("reference compiled", lambda: backward_of(ref_compiled, [z_pred]), reason),
                          Variant("triton", lambda: backward_of(ours, [z_pred])),
                          Variant("cuda C++", lambda: cuda_pass, cuda_reason)],
        # forward reads both; backward reads both again and writes d_z_pred
        bytes_forward=2 * numel * size, bytes_forward_backward=5 * numel * size,
        notes="gradient to z_pred only (frozen encoder target)", headline=headline)


def cases(device, smoke):
    if smoke:
        return [_shape_case(device, 2, 7, 72, torch.float32, smoke, "smoke")]
    return [_shape_case(device, 32, 256, 768, torch.bfloat16, smoke, "SiT-XL/2 256px DINOv2-B", headline=True),
            _shape_case(device, 32, 257, 1024, torch.bfloat16, smoke, "REG class token, DINOv2-L"),
            _shape_case(device, 32, 1024, 768, torch.bfloat16, smoke, "512px DINOv2-B")]
