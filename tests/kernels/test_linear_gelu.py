"""kernels.linear_gelu (SiT's MLP with the GELU in fc1's forward and fc2's backward matmul epilogues)
against its reference (CPU: Triton interpreter)."""
import importlib

import pytest
import torch

import kernels
from tests.helpers import assert_close, grads, leaf, poisoned_empty

module = importlib.import_module("kernels.linear_gelu")

DTYPES = [torch.float32, torch.bfloat16]
# (rows, K, N): masked row, column and K tails of the interpreter's 32 x 32 x 32 tiles (72, 33, 300 =
# 9 x 32 + 12), a single row, one where every size is a tile multiple
SHAPES = [((2, 5), 72, 144), ((1,), 33, 40), ((70,), 300, 72), ((3, 32), 64, 96)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, K, N", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_matches_reference(dtype, rows, K, N, with_bias, device):
    x = leaf((*rows, K), dtype, device, requires_grad=False)
    w = leaf((N, K), dtype, device, requires_grad=False, scale=K ** -0.5 * 2)  # a of scale ~2: GELU's curve
    b = leaf((N,), dtype, device, requires_grad=False) if with_bias else None
    with poisoned_empty():
        g, a = module.linear_gelu_forward(x, w, b)
    g_ref, a_ref = module.reference_linear_gelu(x, w, b)
    for name, actual, expected in (("a", a, a_ref), ("g", g, g_ref)):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        assert not actual.isnan().any(), name
        assert_close(actual, expected, dtype, name=name)


def test_g_is_torchs_gelu_of_a_as_stored(device):
    """g is F.gelu of the a the kernel wrote (fp32: to fp32 rounding), whatever rounding a got."""
    x = leaf((40, 72), torch.float32, device, requires_grad=False, scale=3.0)
    w = leaf((50, 72), torch.float32, device, requires_grad=False, scale=0.3)
    with poisoned_empty():
        g, a = module.linear_gelu_forward(x, w, None)
    torch.testing.assert_close(g, torch.nn.functional.gelu(a, approximate="tanh"), atol=1e-6, rtol=1e-6)


def test_aot_specs_cover_both_tables():
    """The AOT builds: one per (dtype, GPU table), at the shapes of SiT's MLP, no hint lost (all sizes
    multiples of 16), the tiles of _GPU_CONFIGS."""
    specs = module.aot_specs()
    names = {s.name for s in specs}
    assert names == {f"linear_gelu_{k}[{t}, sm_{a}0 table]" for k in ("fwd", "bwd") for t in ("bf16", "fp32")
                     for a in (8, 9)}
    for spec in specs:
        assert spec.not_divisible == (), spec.name
        arch = 9 if "sm_90" in spec.name else 8
        dtype = torch.bfloat16 if "bf16" in spec.name else torch.float32
        kernel = "bwd" if "bwd" in spec.name else "fwd"
        block_m, block_n, block_k, num_warps, num_stages = module.gpu_config(arch, dtype, kernel)
        c = spec.constexprs
        assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], spec.num_warps, spec.num_stages) == (
            block_m, block_n, block_k, num_warps, num_stages), spec.name
        assert c["PRECISION"] == "tf32"


# (rows, D, H, D_out): tails in every dimension of the 32 x 32 x 32 interpreter tiles, one row,
# SiT's H = 4 D at an awkward width (72 -> 288), fc2's outputs narrower than its inputs
MLP_SHAPES = [((2, 5), 72, 288, 72), ((1,), 40, 33, 24), ((70,), 48, 100, 36)]


def _mlp_grads(backend, inputs, dy):
    with kernels.use_backend(backend), poisoned_empty():
        y = kernels.mlp_gelu(*inputs)
        y.backward(dy)
    return [y] + grads(inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, D, H, D_out", MLP_SHAPES)
@pytest.mark.parametrize("fc2_bias", [True, False])
def test_mlp_forward_and_every_gradient_match_reference(dtype, rows, D, H, D_out, fc2_bias, device):
    x = leaf((*rows, D), dtype, device)
    w1 = leaf((H, D), dtype, device, scale=2 * D ** -0.5)  # a of scale ~2: GELU's curve, not its tails
    b1 = leaf((H,), dtype, device)
    w2 = leaf((D_out, H), dtype, device, scale=H ** -0.5)
    b2 = leaf((D_out,), dtype, device) if fc2_bias else None
    dy = torch.randn((*rows, D_out), device=device).to(dtype)
    inputs = [x, w1, b1, w2, b2]
    ours, expected = _mlp_grads("triton", inputs, dy), _mlp_grads("torch", inputs, dy)
    assert ours[0].grad_fn is not None and "MlpGelu" in type(ours[0].grad_fn).__name__
    for name, a, e in zip(["y", "d_x", "d_w1", "d_b1", "d_w2", "d_b2"], ours, expected, strict=True):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert not a.isnan().any(), name
        assert_close(a, e, dtype, name=name)


def test_mlp_gradients_only_where_asked(device):
    x = leaf((3, 40), torch.float32, device, requires_grad=False)
    w1, w2 = leaf((64, 40), torch.float32, device), leaf((40, 64), torch.float32, device, requires_grad=False)
    b1 = torch.randn(64, device=device)
    with kernels.use_backend("triton"):
        kernels.mlp_gelu(x, w1, b1, w2).sum().backward()
    assert w1.grad is not None and b1.grad is None and w2.grad is None


def test_mlp_bias_gradient_is_deterministic(device):
    """Two backwards give bitwise the same gradients (per-tile partial sums, no atomics)."""
    inputs = [leaf((130, 48), torch.float32, device), leaf((96, 48), torch.float32, device),
              leaf((96,), torch.float32, device), leaf((48, 96), torch.float32, device), None]
    dy = torch.randn(130, 48, device=device)
    first, second = (_mlp_grads("triton", inputs, dy) for _ in range(2))
    for a, b in zip(first[:4], second[:4]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad, match", [
    (dict(w1=(64, 41)), r"mlp_gelu: fc1_weight must be \(H, 40\)"),
    (dict(w2=(40, 63)), r"mlp_gelu: fc2_weight must be \(D_out, 64\)"),
    (dict(b1=(63,)), r"mlp_gelu: fc1_bias must be \(64,\), got \(63,\)"),
])
def test_bad_shapes_are_one_clear_error(bad, match, device):
    shapes = dict(w1=(64, 40), b1=(64,), w2=(40, 64)) | bad
    with pytest.raises(ValueError, match=match):
        kernels.mlp_gelu(torch.randn(2, 40, device=device), *(torch.randn(shapes[k], device=device)
                                                               for k in ("w1", "b1", "w2")))


def test_unsupported_dtype_runs_the_reference(device):
    inputs = [torch.randn(s, dtype=torch.float64, device=device) for s in ((3, 16), (24, 16), (24,), (16, 24))]
    with kernels.use_backend("triton"):
        y = kernels.mlp_gelu(*inputs)
    torch.testing.assert_close(y, module.reference_mlp_gelu(*inputs), atol=0, rtol=0)


def test_compiled_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    inputs = [leaf((2, 5, 24), torch.float32, device), leaf((48, 24), torch.float32, device),
              leaf((48,), torch.float32, device), leaf((24, 48), torch.float32, device),
              leaf((24,), torch.float32, device)]

    def loss(*inputs):
        return kernels.mlp_gelu(*inputs).square().mean()

    results = []
    with kernels.use_backend("triton"):
        for fn in (loss, torch.compile(loss, fullgraph=True)):
            value = fn(*inputs)
            results.append((value, torch.autograd.grad(value, inputs)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for eager, compiled in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(eager, compiled)


def test_opcheck(device):
    inputs = [torch.randn(s, device=device, requires_grad=True) for s in ((2, 5, 24), (40, 24), (40,), (16, 40))]
    torch.library.opcheck(module._mlp_gelu.op, (*inputs, None))


def test_fp32_fc1_bias_with_bf16_operands(device):
    """A bf16-mixed model's fp32 fc1 bias: added as autocast's bf16 cast of it, its gradient in fp32 and
    as exact as an fp32 sum of the bf16 dL/da (the reference's bf16-rounded sum is within bf16 tolerance)."""
    x, w1 = leaf((3, 40, 48), torch.bfloat16, device), leaf((100, 48), torch.bfloat16, device, scale=0.3)
    b1, w2 = leaf((100,), torch.float32, device), leaf((36, 100), torch.bfloat16, device, scale=0.1)
    dy = torch.randn(3, 40, 36, device=device).to(torch.bfloat16)
    inputs = [x, w1, b1, w2, None]
    ours, expected = _mlp_grads("triton", inputs, dy), _mlp_grads("torch", inputs, dy)
    assert "MlpGelu" in type(ours[0].grad_fn).__name__  # the kernel ran, not the mixed-dtype fallback
    assert ours[3].dtype == torch.float32
    for name, a, e in zip(["y", "d_x", "d_w1", "d_b1", "d_w2"], ours, expected):
        assert_close(a, e, torch.bfloat16, name=name)
