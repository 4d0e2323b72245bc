"""Shared test tools: tolerances per dtype, poisoned outputs, reference comparison."""
from __future__ import annotations

import contextlib

import torch

# Tolerances for a fused kernel against its reference, both computing in fp32 (fp64 for fp64 inputs).
# bf16/fp16 outputs differ by the rounding of the final cast and of any bf16 intermediate the
# reference stores, so they are compared relative to the output's scale.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close(actual, expected, dtype=None, scale=None, name=""):
    """assert_close with the tolerance of `dtype` (default: expected's), absolute part scaled by
    `scale` (default: the largest magnitude in expected, at least 1)."""
    dtype = dtype or expected.dtype
    tol = TOLERANCES[dtype]
    if scale is None:
        scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().to(torch.float64), expected.detach().to(torch.float64),
                               atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


def assert_all_close(actual, expected, names, dtype):
    """assert_close on each (actual, expected) pair, named; where expected is None, actual must be too
    (a gradient that should not exist); dtype and shape must match exactly."""
    for name, a, e in zip(names, actual, expected, strict=True):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
        assert_close(a, e, dtype, name=name)


@contextlib.contextmanager
def poisoned_empty():
    """Make torch.empty / empty_like return NaN-filled tensors (float) or max-filled (int) inside the
    block, so a kernel that forgets to write part of its output fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    def empty(*args, **kwargs):
        return fill(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return fill(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def grads(tensors):
    """The .grad of each tensor (None where it has none), then cleared."""
    out = []
    for t in tensors:
        out.append(None if t is None or t.grad is None else t.grad.clone())
        if t is not None:
            t.grad = None
    return out


def leaf(shape, dtype, device, requires_grad=True, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype).requires_grad_(requires_grad)
