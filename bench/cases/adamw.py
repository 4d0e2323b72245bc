"""Benchmark cases for kernels.adamw_step (a multi-tensor AdamW step over a model's parameters):
torch.optim.AdamW with foreach and with fused (the reference of the ratios: the first variant) against
the CUDA C++ kernel (csrc/adamw.cu) where built, with the clip divisor as grad_scale and, for the CUDA
kernel alone, the bf16 copy of the parameters written too (what the step-speed work would read instead
of casting every weight). Timed as "forward": one optimizer step.

bytes moved per fp32 parameter: read p, g, m, v and write p, m, v = 28 B (+ 2 B for the bf16 copy);
counted without the copy, so the CUDA kernel's ratio understates it by 2 / 30.
"""
import torch

import kernels
from kernels import _cuda
from bench.common import BenchCase, Variant

# SiT-XL/2's parameter shapes, roughly: 28 blocks of qkv, proj, fc1, fc2, adaLN (weights and biases)
SIT_XL_BLOCK = [(3456, 1152), (3456,), (1152, 1152), (1152,), (4608, 1152), (4608,), (1152, 4608), (1152,),
                (6912, 1152), (6912,)]


def _case(device, shapes, label):
    params = [torch.randn(s, device=device) for s in shapes]
    numel = sum(p.numel() for p in params)
    grads = [torch.randn_like(p) for p in params]
    scale = torch.tensor([1.5], device=device)
    copies = [torch.empty(p.shape, dtype=torch.bfloat16, device=device) for p in params]

    def torch_variant(**flags):
        def make():
            leaves = [p.clone().requires_grad_() for p in params]
            for leaf, g in zip(leaves, grads):
                leaf.grad = g.clone()
            optimizer = torch.optim.AdamW(leaves, lr=1e-4, weight_decay=0.0, **flags)
            optimizer.grad_scale = scale if flags.get("fused") else None  # fused: the divisor inside the kernel
            return optimizer.step
        return make

    def cuda_variant():
        ours = [p.clone() for p in params]
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        state = {"step": 0}

        def run():
            state["step"] += 1
            with kernels.use_backend("cuda"):
                kernels.adamw_step(ours, grads, m, v, state["step"], lr=1e-4, grad_scale=scale, params_bf16=copies)
        return _cuda.launched(run, "adamw_step")

    fused_reason = None if device.type == "cuda" or hasattr(torch, "_fused_adamw_") else "no fused AdamW"
    return BenchCase(
        "adamw_step", f"{len(params)} tensors {numel / 1e6:.1f}M fp32 {label}",
        forward=[Variant("torch AdamW foreach", torch_variant(foreach=True)),
                 Variant("torch AdamW fused", torch_variant(fused=True), fused_reason),
                 Variant("cuda C++", cuda_variant, _cuda.unavailable("adamw", device))],
        bytes_forward=28 * numel, notes="fp32 grads, grad_scale given; the CUDA kernel also writes a bf16 copy")


def cases(device, smoke):
    if smoke:
        return [_case(device, [(5,), (64, 72), (4100,)], "smoke")]
    return [_case(device, SIT_XL_BLOCK * 28, "SiT-XL/2 blocks")]
