"""The CUDA C++ interpolant and velocity loss (csrc/interpolant.cu) against reference_interpolant and
reference_velocity_loss, run on the CPU by the CUDA emulator (kernels.set_backend("cuda") with
ALIGNFLOW_CUEMU=1); on a GPU the real kernels, from the fatbin shared object. Outputs are poisoned (NaN)
before the kernels write them; every input gets its gradient checked."""
import os
import textwrap

import pytest
import torch

import kernels
from kernels import _cuda
from tests.kernels.csrc_fixtures import csrc_build, ran_cuda, run_under_asan  # noqa: F401 (csrc_build: autouse)
from tests.helpers import assert_all_close, assert_close, grads, leaf, poisoned_empty

# SiT latents (S = 64), an odd S (element loads), two chunks per row (S = 4096), REG's class token
# (rank 2: one channel, S = 1152), a single row of 72
SHAPES = [(2, 4, 8, 8), (3, 3, 5, 7), (1, 4, 64, 64), (2, 1152), (1, 1, 72)]
DTYPES = [torch.float32, torch.bfloat16]
# every shape runs every shift form, each path twice
SHIFTS = [("none", "linear"), ("channel", "cosine"), ("full", "linear"), ("batch", "cosine"),
          ("channel+full", "linear")]


def _shift(kind, shape, dtype, device):
    """A CAR-Flow shift: per sample and channel (constant over S: the kernels' row form), full, or full
    and shared by the batch (row stride 0)."""
    if kind == "none":
        return None
    if kind == "channel":
        return leaf((shape[0], shape[1] if len(shape) >= 3 else 1) + (1,) * (len(shape) - 2), dtype, device, scale=0.3)
    if kind == "full":
        return leaf(shape, dtype, device, scale=0.3)
    return leaf((1,) + tuple(shape[1:]), dtype, device, scale=0.3)  # "batch"


def _inputs(shape, dtype, device, kind, v_dtype=None, shift_dtype=None):
    x, noise = leaf(shape, dtype, device), leaf(shape, dtype, device)
    v_pred = leaf(shape, v_dtype or dtype, device)
    t = torch.rand(shape[0], device=device)
    t[0] = 0.0 if shape[0] > 1 else t[0]  # an end point of the path
    kinds = kind.split("+") + ["none"]
    mu0 = _shift(kinds[0], shape, shift_dtype or dtype, device)
    mu1 = _shift(kinds[1], shape, shift_dtype or dtype, device)
    return v_pred, x, noise, t, mu0, mu1


def _interpolant(backend, v_pred, x, noise, t, mu0, mu1, path, only_xt=False):
    leaves = [x, noise, mu0, mu1]
    with kernels.use_backend(backend), poisoned_empty():
        x_t, v = kernels.interpolant(x, noise, t, path, mu0, mu1)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
        if only_xt:  # the trainer's call: v_target unused
            x_t.backward(g)
        else:
            torch.autograd.backward([x_t, v], [g, 0.5 * g.flip(0)])
    return [x_t, v] + grads(leaves)


def _velocity(backend, v_pred, x, noise, t, mu0, mu1, path, reduction="none"):
    leaves = [v_pred, x, noise, mu0, mu1]
    with kernels.use_backend(backend), poisoned_empty():
        loss = kernels.velocity_loss(v_pred, x, noise, t, path, mu0, mu1, reduction=reduction)
        loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape))
    return [loss] + grads(leaves)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_interpolant(shape, dtype, device):
    for kind, path in SHIFTS:
        inputs = _inputs(shape, dtype, device, kind)
        actual = ran_cuda(["interpolant_forward", "interpolant_backward"],
                           lambda: _interpolant("cuda", *inputs, path))
        assert_all_close(actual, _interpolant("torch", *inputs, path),
                 [f"{kind} {path} {n}" for n in ("x_t", "v", "d_x", "d_noise", "d_mu0", "d_mu1")], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_velocity_loss(shape, dtype, device):
    for kind, path in SHIFTS:
        inputs = _inputs(shape, dtype, device, kind)
        actual = ran_cuda(["velocity_forward", "velocity_backward"], lambda: _velocity("cuda", *inputs, path))
        assert_all_close(actual, _velocity("torch", *inputs, path),
                 [f"{kind} {path} {n}" for n in ("loss", "d_v_pred", "d_x", "d_noise", "d_mu0", "d_mu1")], dtype)


@pytest.mark.parametrize("mode", ["bf16-mixed", "full bf16 shifts"])
def test_training_call(mode, device):
    """The trainer's calls under bf16-mixed: fp32 latents and noise without gradient, a bf16 prediction,
    bf16 shifts (per channel, or full: converted exactly to fp32), the interpolant's v unused."""
    kind = "channel" if mode == "bf16-mixed" else "full"
    v_pred, x, noise, t, mu0, mu1 = _inputs((4, 4, 16, 16), torch.float32, device, f"{kind}+{kind}",
                                            v_dtype=torch.bfloat16, shift_dtype=torch.bfloat16)
    x.requires_grad_(False)
    noise.requires_grad_(False)
    for path in ("linear", "cosine"):
        actual = ran_cuda(["interpolant_forward", "interpolant_backward"],
                           lambda: _interpolant("cuda", v_pred, x, noise, t, mu0, mu1, path, only_xt=True))
        expected = _interpolant("torch", v_pred, x, noise, t, mu0, mu1, path, only_xt=True)
        assert_all_close(actual, expected, ["x_t", "v", "d_x", "d_noise", "d_mu0", "d_mu1"], torch.bfloat16)
        actual = ran_cuda(["velocity_forward", "velocity_backward"],
                           lambda: _velocity("cuda", v_pred, x, noise, t, mu0, mu1, path, reduction="mean"))
        expected = _velocity("torch", v_pred, x, noise, t, mu0, mu1, path, reduction="mean")
        assert_close(actual[0], expected[0], torch.float32, name="loss")
        assert_all_close(actual[1:], expected[1:], ["d_v_pred", "d_x", "d_noise", "d_mu0", "d_mu1"], torch.bfloat16)


def test_thread_order_does_not_change_a_bit(device):
    """Deterministic chunk sums: the emulator running threads in a shuffled order gives bitwise the same
    loss and gradients (a race or an order-dependent sum would not)."""
    if device.type != "cpu":
        pytest.skip("thread order is an emulator option")
    inputs = _inputs((2, 4, 64, 64), torch.float32, device, "channel+channel")
    ordered = ran_cuda(["velocity_backward"], lambda: _velocity("cuda", *inputs, "cosine"))
    ordered += _interpolant("cuda", *inputs, "linear")
    lib = _cuda.library("flow", device)
    lib.alignflow_cuemu_configure(2, int.from_bytes(os.urandom(4), "little"), 0)
    try:
        shuffled = _velocity("cuda", *inputs, "cosine") + _interpolant("cuda", *inputs, "linear")
    finally:
        lib.alignflow_cuemu_configure(0, 0, 0)
    for i, (a, b) in enumerate(zip(ordered, shuffled)):
        assert (a is None and b is None) or torch.equal(a, b), i


def test_fallbacks_are_named_once(device, caplog):
    """A full fp32 shift with bf16 x (no exact conversion) and a float16 prediction with bf16 x run the
    Triton kernels, and say so once."""
    _cuda._logged.clear()
    v_pred, x, noise, t, mu0, mu1 = _inputs((1, 2, 4, 4), torch.bfloat16, device, "full", v_dtype=torch.float16,
                                            shift_dtype=torch.float32)
    with caplog.at_level("WARNING", logger="kernels"), kernels.use_backend("cuda"):
        for _ in range(2):
            kernels.interpolant(x, noise, t, "linear", mu0, mu1)
            kernels.velocity_loss(v_pred, x, noise, t, "linear")
    messages = [r.getMessage() for r in caplog.records if "CUDA" in r.getMessage() or "Triton kernel" in r.getMessage()]
    assert messages == [
        'kernels.interpolant: the "cuda" backend runs the Triton kernel (source_shift torch.float32 varying over '
        "the pixels with x torch.bfloat16 (x's dtype, or any with an fp32 x))",
        'kernels.velocity_loss: the "cuda" backend runs the Triton kernel (v_pred torch.float16 with x '
        'torch.bfloat16)'], messages


def test_address_sanitizer_run(tmp_path):
    """Both ops forward and backward in an AddressSanitizer build of the emulated kernels (vector and
    element loads, row and full shifts): any out-of-bounds access fails the run."""
    if _cuda.emulator_missing():
        pytest.skip(_cuda.emulator_missing())
    script = textwrap.dedent("""
        import torch, kernels
        from kernels import _cuda
        kernels.set_backend("cuda")
        for shape in ((2, 4, 8, 8), (2, 3, 5, 7), (3, 100)):
            x, noise, v_pred = (torch.randn(shape, requires_grad=True) for _ in range(3))
            t = torch.rand(shape[0])
            mu0 = torch.randn((shape[0], shape[1]) + (1,) * (len(shape) - 2), requires_grad=True)
            mu1 = torch.randn(shape, requires_grad=True)
            x_t, v = kernels.interpolant(x, noise, t, "cosine", mu0, mu1)
            (x_t.sum() + v.square().sum()).backward()
            loss = kernels.velocity_loss(v_pred, x, noise, t, "linear", mu0, mu1)
            loss.backward()
            ref = kernels.reference_velocity_loss(v_pred, x, noise, t, "linear", mu0, mu1)
            torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        assert _cuda.launches["velocity_backward"] == 3 and _cuda.launches["interpolant_backward"] == 3, _cuda.launches
        print("ok")
    """)
    run_under_asan(script, "flow")
