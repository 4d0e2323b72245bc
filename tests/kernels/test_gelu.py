"""kernels.gelu_tanh (the MLP's GELU with fc1's bias gradient in its backward pass) against its reference
(CPU: Triton interpreter), and the SiT MLP with it against nn.Linear + F.gelu."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.helpers import assert_close, grads, leaf, poisoned_empty

gelu_module = importlib.import_module("kernels.gelu")

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# masked column tails (N = 72, 33, 300 = 2 x 128 + 44 lanes), one row, three row tiles (M = 130)
SHAPES = [(2, 5, 72), (1, 1, 33), (3, 10, 300), (130, 128)]


def _run(backend, a, bias):
    with kernels.use_backend(backend), poisoned_empty():
        return kernels.gelu_tanh(a, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gelu_tanh_matches_reference(dtype, shape, with_bias, device):
    a = leaf(shape, dtype, device, scale=3.0)  # reaches the tails of tanh
    bias = leaf(shape[-1:], dtype, device) if with_bias else None
    dg = torch.randn(shape, device=device).to(dtype)
    results = {}
    for backend in ("triton", "torch"):
        g = _run(backend, a, bias)
        g.backward(dg)
        results[backend] = [g] + grads([a, bias])
    for name, actual, expected in zip(["g", "d_a", "d_bias"], results["triton"], results["torch"]):
        if expected is None:
            assert actual is None, name
            continue
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        assert not actual.isnan().any(), name
        # d_bias: the reference sums up to M bf16 terms into a bf16 result, the kernel in fp32
        assert_close(actual, expected, dtype, name=name)


def test_reference_backward_formula_is_torchs(device):
    """The kernel's formula (reference_gelu_tanh_backward) is the derivative torch's GELU(tanh) uses."""
    a = leaf((4, 257), torch.float64, device, scale=4.0)
    dg = torch.randn(4, 257, dtype=torch.float64, device=device)
    (expected,) = torch.autograd.grad(F.gelu(a, approximate="tanh"), a, dg)
    torch.testing.assert_close(gelu_module.reference_gelu_tanh_backward(a.detach(), dg), expected,
                               atol=1e-12, rtol=1e-12)


def test_bias_gradient_is_the_linear_bias_gradient(device):
    """gelu_tanh(F.linear(x, W, b.detach()), b) gives x, W and b the gradients of
    F.gelu(F.linear(x, W, b)): bitwise on the torch backend, within fp32 rounding with the kernel."""
    x = leaf((3, 7, 24), torch.float32, device)
    w, b = leaf((40, 24), torch.float32, device), leaf((40,), torch.float32, device)
    dg = torch.randn(3, 7, 40, device=device)
    F.gelu(F.linear(x, w, b), approximate="tanh").backward(dg)
    expected = grads([x, w, b])
    for backend in ("torch", "triton"):
        with kernels.use_backend(backend):
            kernels.gelu_tanh(F.linear(x, w, b.detach()), b).backward(dg)
        for name, actual, ref in zip("xwb", grads([x, w, b]), expected):
            if backend == "torch":
                assert torch.equal(actual, ref), name
            else:
                assert_close(actual, ref, torch.float32, name=f"{backend} d_{name}")


def test_no_bias_gradient_without_a_bias_that_needs_one(device):
    a = leaf((2, 3, 16), torch.float32, device)
    frozen = torch.randn(16, device=device)
    with kernels.use_backend("triton"):
        kernels.gelu_tanh(a, frozen).sum().backward()
    assert frozen.grad is None and a.grad is not None


def test_bad_bias_shape_is_one_clear_error(device):
    with pytest.raises(ValueError, match=r"gelu_tanh: bias must be \(16,\)"):
        kernels.gelu_tanh(torch.randn(2, 16, device=device), torch.randn(15, device=device))


def test_compiled_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    x = leaf((2, 5, 24), torch.float32, device)
    w, b = leaf((48, 24), torch.float32, device), leaf((48,), torch.float32, device)

    def mlp(x, w, b):
        return kernels.gelu_tanh(F.linear(x, w, b.detach()), b).square().mean()

    results = []
    with kernels.use_backend("triton"):
        for fn in (mlp, torch.compile(mlp, fullgraph=True)):
            loss = fn(x, w, b)
            results.append((loss, torch.autograd.grad(loss, [x, w, b])))
    torch.testing.assert_close(results[0][0], results[1][0])
    for eager, compiled in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(eager, compiled)


def test_opcheck(device):
    a = torch.randn(2, 5, 40, device=device, requires_grad=True)
    torch.library.opcheck(gelu_module._gelu_tanh.op, (a, torch.randn(40, device=device, requires_grad=True)))
