"""kernels.interpolant and kernels.velocity_loss against their references (CPU: Triton interpreter)."""
import re

import pytest
import torch

import kernels
from tests.helpers import assert_close, grads, leaf, poisoned_empty

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# SiT-XL latents, a single sample, odd spatial sizes, a REG-style (B, D) token, a 5-D video-like tensor
SHAPES = [(2, 4, 32, 32), (1, 4, 32, 32), (3, 4, 7, 5), (3, 72), (2, 3, 2, 5, 3)]
SHIFTS = {  # name -> shape of the shift given x's shape
    "none": None,
    "full": lambda s: s,
    "per_channel": lambda s: (s[0], s[1]) + (1,) * (len(s) - 2),
    "shared_channel": lambda s: (1, s[1]) + (1,) * (len(s) - 2),
    "per_sample_scalar": lambda s: (s[0],) + (1,) * (len(s) - 1),
}


def _run(fn, backend, args):
    with kernels.use_backend(backend):
        return fn(*args)


def _inputs(shape, dtype, device, source, target, x_grad=False):
    x = leaf(shape, dtype, device, requires_grad=x_grad)
    noise = leaf(shape, dtype, device, requires_grad=False)
    t = torch.rand(shape[0], device=device)
    mu0 = None if SHIFTS[source] is None else leaf(SHIFTS[source](shape), dtype, device, scale=0.5)
    mu1 = None if SHIFTS[target] is None else leaf(SHIFTS[target](shape), dtype, device, scale=0.5)
    return x, noise, t, mu0, mu1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("source,target", [("none", "none"), ("per_channel", "full"), ("full", "per_channel"),
                                           ("shared_channel", "per_sample_scalar")])
def test_interpolant_matches_reference(dtype, shape, path, source, target, device):
    x, noise, t, mu0, mu1 = _inputs(shape, dtype, device, source, target, x_grad=True)
    g_xt, g_v = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)
    results = {}
    for backend in ("triton", "torch"):
        with poisoned_empty():
            x_t, v = _run(kernels.interpolant, backend, (x, noise, t, path, mu0, mu1))
        torch.autograd.backward([x_t, v], [g_xt, g_v])
        results[backend] = [x_t, v] + grads([x, mu0, mu1])
    names = ["x_t", "v", "d_x", "d_source_shift", "d_target_shift"]
    for name, actual, expected in zip(names, results["triton"], results["torch"]):
        if expected is None:
            assert actual is None, name
            continue
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        # a reduced shift gradient sums up to C*S bf16-rounded terms in the reference
        assert_close(actual, expected, dtype, name=name)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_formula(path, device):
    """The reference itself: linear v = noise - x; both paths x_t = x at t=0 and x_t = noise at t=1."""
    x, noise = torch.randn(3, 4, 2, 2, device=device), torch.randn(3, 4, 2, 2, device=device)
    t = torch.tensor([0.0, 1.0, 0.25], device=device)
    x_t, v = kernels.reference_interpolant(x, noise, t, path)
    torch.testing.assert_close(x_t[0], x[0])
    torch.testing.assert_close(x_t[1], noise[1], atol=1e-6, rtol=0)
    if path == "linear":
        torch.testing.assert_close(v, noise - x)
        torch.testing.assert_close(x_t[2], 0.75 * x[2] + 0.25 * noise[2])
    else:  # v is the time derivative of x_t
        h = 1e-3
        t2 = torch.full((3,), 0.4, device=device, dtype=torch.float64)
        up, _ = kernels.reference_interpolant(x.double(), noise.double(), t2 + h, path)
        down, _ = kernels.reference_interpolant(x.double(), noise.double(), t2 - h, path)
        _, v2 = kernels.reference_interpolant(x.double(), noise.double(), t2, path)
        torch.testing.assert_close((up - down) / (2 * h), v2, atol=1e-5, rtol=0)


def test_shifts_enter_both_ends(device):
    """CAR-Flow: at t=0 x_t = x + mu1, at t=1 x_t = noise + mu0."""
    x, noise = torch.randn(2, 4, 3, 3, device=device), torch.randn(2, 4, 3, 3, device=device)
    mu0, mu1 = torch.randn(2, 4, 1, 1, device=device), torch.randn(2, 4, 1, 1, device=device)
    with kernels.use_backend("triton"):
        x_t, _ = kernels.interpolant(x, noise, torch.tensor([0.0, 1.0], device=device), "linear", mu0, mu1)
    torch.testing.assert_close(x_t[0], (x + mu1)[0])
    torch.testing.assert_close(x_t[1], (noise + mu0)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("source,target", [("none", "none"), ("per_channel", "per_channel"), ("full", "shared_channel")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_velocity_loss_matches_reference(dtype, shape, path, source, target, reduction, device):
    x, noise, t, mu0, mu1 = _inputs(shape, dtype, device, source, target)
    v_pred = leaf(shape, dtype, device)
    weights = torch.rand(shape[0], device=device) if reduction == "none" else torch.ones((), device=device)
    results = {}
    for backend in ("triton", "torch"):
        with poisoned_empty():
            loss = _run(kernels.velocity_loss, backend, (v_pred, x, noise, t, path, mu0, mu1, reduction))
        (loss * weights.to(loss.dtype)).sum().backward()
        results[backend] = [loss] + grads([v_pred, mu0, mu1])
    assert results["triton"][0].shape == ((shape[0],) if reduction == "none" else ())
    for name, actual, expected in zip(["loss", "d_v_pred", "d_source_shift", "d_target_shift"],
                                      results["triton"], results["torch"]):
        if expected is None:
            assert actual is None, name
            continue
        assert actual.dtype == expected.dtype, name
        assert_close(actual, expected, dtype, name=name)


def test_velocity_loss_equals_mse_of_interpolant_target(device):
    x, noise, v_pred = (torch.randn(4, 4, 8, 8, device=device) for _ in range(3))
    t = torch.rand(4, device=device)
    with kernels.use_backend("triton"):
        _, v = kernels.interpolant(x, noise, t, "cosine")
        loss = kernels.velocity_loss(v_pred, x, noise, t, "cosine", reduction="none")
    torch.testing.assert_close(loss, ((v_pred - v) ** 2).mean((1, 2, 3)))


def test_non_contiguous_inputs(device):
    base = torch.randn(2, 8, 16, 16, device=device)
    x = base[:, ::2]  # strided channels
    noise = torch.randn(2, 16, 16, 4, device=device).permute(0, 3, 1, 2)  # channels-last
    v_pred = torch.randn(2, 4, 16, 16, device=device).transpose(2, 3).requires_grad_()
    mu1 = torch.randn(2, 4, device=device)[:, :, None, None].requires_grad_()
    t = torch.rand(4, device=device)[::2]
    out = {}
    for backend in ("triton", "torch"):
        loss = _run(kernels.velocity_loss, backend, (v_pred, x, noise, t, "linear", None, mu1))
        x_t, _ = _run(kernels.interpolant, backend, (x, noise, t, "linear", None, mu1))
        (loss + x_t.square().mean()).backward()
        out[backend] = [loss, x_t] + grads([v_pred, mu1])
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic(device):
    x, noise, t, mu0, mu1 = _inputs((4, 4, 16, 16), torch.float32, device, "per_channel", "shared_channel")
    v_pred = leaf(x.shape, torch.float32, device)
    runs = []
    for _ in range(2):
        with kernels.use_backend("triton"):
            kernels.velocity_loss(v_pred, x, noise, t, "linear", mu0, mu1).backward()
        runs.append(grads([v_pred, mu0, mu1]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bad_inputs_are_named():
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="path must be one of"):
        kernels.interpolant(x, x, torch.rand(2), path="vp")
    with pytest.raises(ValueError, match="t must have shape"):
        kernels.interpolant(x, x, torch.rand(3))
    with pytest.raises(ValueError, match="target_shift shape"):
        kernels.interpolant(x, x, torch.rand(2), target_shift=torch.randn(3, 4, 1, 1))
    with pytest.raises(ValueError, match="reduction must be"):
        kernels.velocity_loss(x, x, x, torch.rand(2), reduction="max")


def test_t_with_grad_falls_back_to_reference(caplog):
    x, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.rand(2, requires_grad=True)
    with kernels.use_backend("triton"):
        x_t, _ = kernels.interpolant(x, noise, t)
    x_t.sum().backward()
    torch.testing.assert_close(t.grad, (noise - x).sum((1, 2, 3)))


def test_shift_shape_check_broadcasts_as_torch_does():
    """The shift shape check's plain-Python broadcast agrees with torch.broadcast_shapes on random
    shape pairs, those that do not broadcast included."""
    from kernels.interpolant import _broadcast_shape

    rng = torch.Generator().manual_seed(torch.seed())
    for _ in range(2000):
        a, b = (tuple(torch.randint(1, 4, (int(torch.randint(0, 5, (), generator=rng)),), generator=rng).tolist())
                for _ in range(2))
        try:
            want = tuple(torch.broadcast_shapes(a, b))
        except RuntimeError:
            want = None
        assert _broadcast_shape(a, b) == want, (a, b)


@pytest.mark.parametrize("shape, message", [((2, 5, 1, 1), "does not broadcast"), ((3, 2, 4, 1, 1), "would enlarge")])
def test_a_bad_shift_shape_is_named(shape, message):
    x, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.rand(2)
    with pytest.raises(ValueError, match=re.escape(f"source_shift shape {tuple(shape)} {message}")):
        kernels.interpolant(x, noise, t, "linear", torch.randn(shape))
