"""kernels.adaln_modulate and kernels.adaln_residual_modulate against their references (CPU: Triton
interpreter).

Tolerances are tests.helpers.TOLERANCES of the input dtype, absolute part relative to the largest
magnitude of each compared tensor. In bf16 the kernel and the reference differ by output rounding and
by the reference's bf16 intermediates (its gradient of x_new is rounded to bf16 before d_gate sums
it); the interpreter also truncates fp32 -> bf16 casts where a GPU rounds to nearest, so x_new may
differ by one bf16 ulp there.
"""
import pytest
import torch
import torch.nn as nn

import kernels
from kernels import adaln
from tests.helpers import assert_all_close, assert_close, grads, leaf, poisoned_empty

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# odd widths, SiT-B/XL widths, a single token, N = 257 (REG class token) with several backward tiles
SHAPES = [(2, 1, 72), (3, 5, 100), (2, 257, 100), (2, 6, 384), (2, 3, 768), (3, 2, 1152)]
RESIDUAL_NAMES = ["x_new", "y", "d_x", "d_h", "d_gate", "d_shift", "d_scale"]
BIAS_NAMES = RESIDUAL_NAMES + ["d_bias"]
MODULATE_NAMES = ["y", "d_x", "d_shift", "d_scale"]


def _modulation(B, D, dtype, device, layout):
    """gate, shift, scale: distinct per-sample vectors, (B, D) ("flat") or (B, 1, D)."""
    shape = (B, D) if layout == "flat" else (B, 1, D)
    return [leaf(shape, dtype, device, scale=0.5) for _ in range(3)]


def _assert_ran(backend, y, function):
    """The Triton path really ran (a silent fallback would make the comparison trivially pass)."""
    if backend == "triton":
        assert type(y.grad_fn).__name__ == f"{function}Backward", y.grad_fn


def _run_residual(backend, x, h, gate, shift, scale, g_x_new, dy, bias=None):
    """[x_new, y, d_x, d_h, d_gate, d_shift, d_scale] (+ [d_bias] with a bias)."""
    leaves = [x, h, gate, shift, scale] + ([bias] if bias is not None else [])
    with kernels.use_backend(backend), poisoned_empty():
        x_new, y = kernels.adaln_residual_modulate(x, h, gate, shift, scale, bias=bias)
        _assert_ran(backend, y, "AdalnResidualModulate")
        pairs = [(out, g) for out, g in ((x_new, g_x_new), (y, dy)) if out.requires_grad]
        torch.autograd.backward(*zip(*pairs))
    return [x_new, y] + grads(leaves)


def _run_modulate(backend, x, shift, scale, dy):
    with kernels.use_backend(backend), poisoned_empty():
        y = kernels.adaln_modulate(x, shift, scale)
        _assert_ran(backend, y, "AdalnModulate")
        y.backward(dy)
    return [y] + grads([x, shift, scale])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_modulate_matches_reference(dtype, shape, device):
    B, N, D = shape
    x, h = leaf(shape, dtype, device), leaf(shape, dtype, device)
    gate, shift, scale = _modulation(B, D, dtype, device, "flat" if N % 2 else "broadcast")
    g_x_new, dy = leaf(shape, dtype, device, False), leaf(shape, dtype, device, False)
    actual = _run_residual("triton", x, h, gate, shift, scale, g_x_new, dy)
    expected = _run_residual("torch", x, h, gate, shift, scale, g_x_new, dy)
    assert_all_close(actual, expected, RESIDUAL_NAMES, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_modulate_with_bias_matches_reference(dtype, shape, device):
    """x_new = x + gate * (h + bias): every gradient, d_bias (summed over all B * N rows) included."""
    B, N, D = shape
    x, h, bias = leaf(shape, dtype, device), leaf(shape, dtype, device), leaf((D,), dtype, device)
    gate, shift, scale = _modulation(B, D, dtype, device, "flat" if N % 2 else "broadcast")
    g_x_new, dy = leaf(shape, dtype, device, False), leaf(shape, dtype, device, False)
    actual = _run_residual("triton", x, h, gate, shift, scale, g_x_new, dy, bias)
    expected = _run_residual("torch", x, h, gate, shift, scale, g_x_new, dy, bias)
    assert_all_close(actual, expected, BIAS_NAMES, dtype)


def test_bias_is_the_linear_bias_it_replaces(device):
    """The specification with a bias equals the op fed the Linear's output with its bias included."""
    B, N, D = 2, 3, 40
    x, h, bias = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, N, D, dtype=torch.float64), \
        torch.randn(D, dtype=torch.float64)
    gate, shift, scale = (torch.randn(B, D, dtype=torch.float64) for _ in range(3))
    with_bias = kernels.reference_adaln_residual_modulate(x, h, gate, shift, scale, bias=bias)
    added = kernels.reference_adaln_residual_modulate(x, h + bias, gate, shift, scale)
    for a, e in zip(with_bias, added):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_modulate_matches_reference(dtype, shape, device):
    B, N, D = shape
    x = leaf(shape, dtype, device)
    _, shift, scale = _modulation(B, D, dtype, device, "flat" if N % 2 else "broadcast")
    dy = leaf(shape, dtype, device, False)
    assert_all_close(_run_modulate("triton", x, shift, scale, dy), _run_modulate("torch", x, shift, scale, dy),
             MODULATE_NAMES, dtype)


def test_reference_is_sit_layernorm_and_modulate(device):
    """The specification: nn.LayerNorm(D, elementwise_affine=False, eps=1e-6), then SiT's modulate
    x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1), and the gated residual x + gate.unsqueeze(1) * h."""
    B, N, D = 3, 4, 40
    x, h = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, N, D, dtype=torch.float64)
    gate, shift, scale = (torch.randn(B, D, dtype=torch.float64) for _ in range(3))
    norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
    x_new = x + gate.unsqueeze(1) * h
    y = norm(x_new) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    actual_x_new, actual_y = kernels.reference_adaln_residual_modulate(x, h, gate, shift, scale)
    torch.testing.assert_close(actual_x_new, x_new)
    torch.testing.assert_close(actual_y, y)
    torch.testing.assert_close(kernels.reference_adaln_modulate(x, shift, scale),
                               norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))


@pytest.mark.parametrize("D", [100, 1152])
def test_samples_use_their_own_modulation(D, device):
    """Each sample of a batch equals that sample run alone: a program that read another sample's
    shift/scale/gate, or a row block that straddled two samples, would fail. The per-sample vectors
    differ by O(1), far beyond the fp32 tolerance."""
    B, N = 3, 7
    x, h, g_x_new, dy = (torch.randn(B, N, D, device=device) for _ in range(4))
    gate, shift, scale = (torch.randn(B, D, device=device) for _ in range(3))
    assert (shift[0] - shift[1]).abs().max() > 0.5
    with kernels.use_backend("triton"):
        batched = _run_residual("triton", *(t.clone().requires_grad_() for t in (x, h, gate, shift, scale)),
                                g_x_new, dy)
        for b in range(B):
            one = _run_residual("triton", *(t[b:b + 1].clone().requires_grad_() for t in (x, h, gate, shift, scale)),
                                g_x_new[b:b + 1], dy[b:b + 1])
            for name, a, e in zip(RESIDUAL_NAMES, batched, one):
                assert_close(a[b:b + 1], e, torch.float32, name=f"{name} of sample {b}")


def test_deterministic(device):
    """Two backward passes give bitwise-equal gradients (several tiles per sample here), d_bias too."""
    B, N, D = 2, 257, 100
    assert adaln._backward_tiles(B, N, adaln._tile(N, D)[0])[0] > 1
    tensors = [leaf((B, N, D), torch.float32, device), leaf((B, N, D), torch.float32, device)]
    tensors += [leaf((B, D), torch.float32, device) for _ in range(3)]
    g_x_new, dy = torch.randn(B, N, D, device=device), torch.randn(B, N, D, device=device)
    bias = leaf((D,), torch.float32, device)
    first = _run_residual("triton", *tensors, g_x_new, dy, bias)
    second = _run_residual("triton", *tensors, g_x_new, dy, bias)
    for name, a, b in zip(BIAS_NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype, device):
    """x transposed from (B, D, N), h a strided slice, gate/shift/scale SiT's chunk() views, output
    gradients non-contiguous too."""
    B, N, D = 2, 9, 72
    x = leaf((B, D, N), dtype, device).transpose(1, 2)
    x.retain_grad()
    h_wide = leaf((B, N, 2 * D), dtype, device)
    h = h_wide[..., ::2]
    base = leaf((B, 6 * D), dtype, device, scale=0.5)  # SiT: adaLN_modulation(c).chunk(6, dim=1)
    gate, shift, scale = base.chunk(6, dim=1)[:3]
    assert not any(t.is_contiguous() for t in (x, h, gate, shift, scale))
    g_x_new = torch.randn(B, D, N, device=device).to(dtype).transpose(1, 2)
    dy = torch.randn(B, N, 2 * D, device=device).to(dtype)[..., 1::2]
    results = {}
    for backend in ("triton", "torch"):
        with kernels.use_backend(backend), poisoned_empty():
            x_new, y = kernels.adaln_residual_modulate(x, h, gate, shift, scale)
            torch.autograd.backward([x_new, y], [g_x_new, dy])
            y2 = kernels.adaln_modulate(x, shift, scale)
            y2.backward(dy)
        _assert_ran(backend, y, "AdalnResidualModulate")
        _assert_ran(backend, y2, "AdalnModulate")
        results[backend] = [x_new, y, y2] + grads([x, h_wide, base])
    assert_all_close(results["triton"], results["torch"], ["x_new", "y", "y (modulate)", "d_x", "d_h", "d_chunks"], dtype)


@pytest.mark.parametrize("with_bias", [False, True])
def test_residual_stream_in_fp32(with_bias, device):
    """x (the residual stream) fp32, everything else bf16: x_new and d_x are fp32, y and d_h bf16. With
    a bias as SiT under autocast hands it over (the fp32 parameter, h the bf16 matmul): d_bias fp32."""
    B, N, D = 2, 5, 100
    x = leaf((B, N, D), torch.float32, device)
    h = leaf((B, N, D), torch.bfloat16, device)
    gate, shift, scale = (leaf((B, 1, D), torch.bfloat16, device, scale=0.5) for _ in range(3))
    bias = leaf((D,), torch.float32, device) if with_bias else None
    g_x_new, dy = torch.randn(B, N, D, device=device), torch.randn(B, N, D, device=device).bfloat16()
    actual = _run_residual("triton", x, h, gate, shift, scale, g_x_new, dy, bias)
    expected = _run_residual("torch", x, h, gate, shift, scale, g_x_new, dy, bias)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == torch.bfloat16
    assert actual[2].dtype == torch.float32 and actual[3].dtype == torch.bfloat16
    assert_close(actual[0], expected[0], torch.float32, name="x_new")  # fp32 sum of bf16 products
    assert_all_close(actual[1:], expected[1:], (BIAS_NAMES if with_bias else RESIDUAL_NAMES)[1:], torch.bfloat16)
    if with_bias:
        assert actual[-1].dtype == torch.float32


@pytest.mark.parametrize("requires", [("x",), ("gate",), ("shift", "scale"), ("h", "scale")])
def test_partial_requires_grad(requires, device):
    """Gradients only for the inputs that require them, each still right."""
    B, N, D = 2, 5, 72
    names = ("x", "h", "gate", "shift", "scale")
    shapes = {"x": (B, N, D), "h": (B, N, D), "gate": (B, D), "shift": (B, D), "scale": (B, D)}
    tensors = [leaf(shapes[n], torch.float32, device, requires_grad=n in requires) for n in names]
    g_x_new, dy = torch.randn(B, N, D, device=device), torch.randn(B, N, D, device=device)
    actual = _run_residual("triton", *tensors, g_x_new, dy)
    expected = _run_residual("torch", *tensors, g_x_new, dy)
    for name, a in zip(names, actual[2:]):
        assert (a is not None) == (name in requires), name
    assert_all_close(actual, expected, RESIDUAL_NAMES, torch.float32)


@pytest.mark.parametrize("requires", [("bias",), ("bias", "gate"), ("bias", "h", "shift")])
def test_partial_requires_grad_with_bias(requires, device):
    """d_bias alone, or with others: each gradient asked for, right; none other computed."""
    B, N, D = 2, 5, 72
    names = ("x", "h", "gate", "shift", "scale", "bias")
    shapes = {"x": (B, N, D), "h": (B, N, D), "gate": (B, D), "shift": (B, D), "scale": (B, D), "bias": (D,)}
    tensors = [leaf(shapes[n], torch.float32, device, requires_grad=n in requires) for n in names]
    g_x_new, dy = torch.randn(B, N, D, device=device), torch.randn(B, N, D, device=device)
    actual = _run_residual("triton", *tensors[:5], g_x_new, dy, tensors[5])
    expected = _run_residual("torch", *tensors[:5], g_x_new, dy, tensors[5])
    for name, a in zip(names, actual[2:]):
        assert (a is not None) == (name in requires), name
    assert_all_close(actual, expected, BIAS_NAMES, torch.float32)


def test_gradients_match_finite_differences(device):
    """The kernel's fp64 backward against finite differences of its forward (with and without a bias)."""
    B, N, D = 2, 3, 5
    tensors = [leaf((B, N, D), torch.float64, device), leaf((B, N, D), torch.float64, device)]
    tensors += [leaf((B, 1, D), torch.float64, device) for _ in range(3)]
    bias = leaf((D,), torch.float64, device)
    with kernels.use_backend("triton"):
        assert torch.autograd.gradcheck(kernels.adaln_residual_modulate, tuple(tensors), fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda *t: kernels.adaln_residual_modulate(*t[:5], bias=t[5]), (*tensors, bias), fast_mode=True)
        assert torch.autograd.gradcheck(kernels.adaln_modulate, (tensors[0], tensors[3], tensors[4]),
                                        fast_mode=True)


def test_bad_inputs_raise(device):
    x = torch.randn(2, 3, 8, device=device)
    v = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match=r"x must be \(B, N, D\)"):
        kernels.adaln_modulate(x[0], v, v)
    with pytest.raises(ValueError, match="shift must be"):
        kernels.adaln_modulate(x, torch.randn(2, 7, device=device), v)
    with pytest.raises(ValueError, match="scale must be"):
        kernels.adaln_modulate(x, v, torch.randn(1, 8, device=device))
    with pytest.raises(ValueError, match="h shape"):
        kernels.adaln_residual_modulate(x, x[:, :2], v, v, v)
    with pytest.raises(ValueError, match="gate must be"):
        kernels.adaln_residual_modulate(x, x, torch.randn(2, 3, 8, device=device), v, v)
    with pytest.raises(ValueError, match=r"adaln_residual_modulate: bias must be \(D,\) = \(8,\), got \(2, 8\)"):
        kernels.adaln_residual_modulate(x, x, v, v, v, bias=v)


def test_too_wide_rows_fall_back_with_a_reason(device):
    D = adaln.MAX_D + 8
    x = torch.randn(1, 2, D, device=device)
    shift, scale = torch.randn(1, D, device=device), torch.randn(1, D, device=device)
    with kernels.use_backend("triton"):
        y = kernels.adaln_modulate(x, shift, scale)
    # logged once per process (kernels._backend.fallback), so look at the record of logged reasons
    assert ("adaln_modulate", f"D = {D} exceeds the kernel's row width {adaln.MAX_D}") in kernels._backend._logged
    torch.testing.assert_close(y, kernels.reference_adaln_modulate(x, shift, scale))
