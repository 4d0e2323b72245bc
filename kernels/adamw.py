"""A fused multi-tensor AdamW step (CUDA C++ only: csrc/adamw.cu), for issue 14's optimizer path.

`adamw_step` updates lists of fp32 parameters and their fp32 AdamW moments in place from fp32 or bf16
gradients, optionally dividing every gradient by a device scalar `grad_scale` (engine.optim's clip /
loss-scale divisor, `clip_divisor`) and writing a bf16 copy of the updated parameters (what a bf16
forward reads, so no per-step cast). Every tensor goes to one launch through a chunk table (a second
launch only for chunks that cannot take 128-bit loads: odd-sized tails, unaligned views).

It is torch.optim.AdamW's update (amsgrad and maximize off, one step count for the list), written in
`reference_adamw_step`. The CUDA kernel runs under `kernels.set_backend("cuda")` where it is built
(and on CPU tensors in the emulator, ALIGNFLOW_CUEMU=1); anything else runs the reference, saying once
why. A non-finite `grad_scale` skips the step on the device: nothing is written (engine.optim hands an
inf divisor for a non-finite gradient norm; it keeps the step count). engine.optim.ClippedAdamW calls it with optim.step_kernel "alignflow" (torch's fused AdamW kernel
otherwise).
"""
from __future__ import annotations

import math

import torch

from . import _cuda
from ._backend import fallback, get_backend


def reference_adamw_step(params, grads, exp_avgs, exp_avg_sqs, step: int, lr: float, betas=(0.9, 0.999),
                         eps: float = 1e-8, weight_decay: float = 0.0, grad_scale: torch.Tensor | None = None,
                         params_bf16=None):
    """torch.optim.AdamW's step `step` (counted from 1) on each tensor, in place, in its order of
    operations; the gradients divided by `grad_scale` first where given, `params_bf16[i]` (where a list
    is given) set to params[i] rounded to bf16. A non-finite `grad_scale` changes nothing."""
    if grad_scale is not None and not bool(torch.isfinite(grad_scale).all()):
        return
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    step_size = lr / bias_correction1
    for i, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        grad = grad.float()
        if grad_scale is not None:
            grad = grad / grad_scale
        param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if params_bf16 is not None:
            params_bf16[i].copy_(param)


def _check(params, grads, exp_avgs, exp_avg_sqs, step, params_bf16):
    n = len(params)
    for name, tensors in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                          ("params_bf16", params_bf16)):
        if tensors is not None and len(tensors) != n:
            raise ValueError(f"adamw_step {name}: {len(tensors)} tensors for {n} params; allowed: one per param")
    for i in range(n):
        for name, tensors in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                              ("params_bf16", params_bf16)):
            if tensors is not None and tensors[i].shape != params[i].shape:
                raise ValueError(f"adamw_step {name}[{i}] shape {tuple(tensors[i].shape)}: allowed "
                                 f"params[{i}]'s {tuple(params[i].shape)}")
    if not (isinstance(step, int) and step >= 1):
        raise ValueError(f"adamw_step step {step!r}: allowed an int >= 1 (the step being taken)")


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, step: int, lr: float, betas=(0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.0, grad_scale: torch.Tensor | None = None,
               params_bf16=None):
    """One AdamW step over lists of tensors, in place (see the module docstring and
    `reference_adamw_step`, its specification)."""
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    params_bf16 = list(params_bf16) if params_bf16 is not None else None
    _check(params, grads, exp_avgs, exp_avg_sqs, step, params_bf16)
    if not params:
        return
    if get_backend() != "cuda":
        fallback("adamw_step", "no Triton kernel: the CUDA C++ one runs under set_backend('cuda')")
    elif _cuda.supports_adamw(params, grads, exp_avgs, exp_avg_sqs, grad_scale, params_bf16):
        return _cuda.adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay,
                                grad_scale, params_bf16)
    reference_adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay, grad_scale,
                         params_bf16)
