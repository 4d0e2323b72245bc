"""kernels.alignment_loss against REPA's projection loss (CPU: Triton interpreter)."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.helpers import assert_close, grads, leaf, poisoned_empty

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SHAPES = [(2, 256, 768), (1, 257, 1024), (3, 7, 72), (2, 5, 1536)]


def _compare(z_pred, z_target, reduction, dtype, weights):
    results = {}
    as_list = lambda z: [z] if isinstance(z, torch.Tensor) else list(z)
    leaves = [z for z in as_list(z_pred) + as_list(z_target) if z.requires_grad]
    for backend in ("triton", "torch"):
        with kernels.use_backend(backend), poisoned_empty():
            loss = kernels.alignment_loss(z_pred, z_target, reduction)
        (loss * weights.to(loss.dtype)).sum().backward()
        results[backend] = [loss] + grads(leaves)
    for i, (actual, expected) in enumerate(zip(results["triton"], results["torch"])):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert_close(actual, expected, dtype, name="loss" if i == 0 else f"grad {i}")
    return results["triton"][0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_encoder(dtype, shape, reduction, device):
    p, q = leaf(shape, dtype, device), leaf(shape, dtype, device, requires_grad=False)
    weights = torch.rand(shape[0], device=device) if reduction == "none" else torch.ones((), device=device)
    _compare(p, q, reduction, dtype, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_encoders_with_target_grad(dtype, device):
    """A list of two encoders of different widths; the target also requires grad."""
    z_pred = [leaf((2, 16, 768), dtype, device), leaf((2, 16, 1024), dtype, device)]
    z_target = [leaf((2, 16, 768), dtype, device), leaf((2, 16, 1024), dtype, device)]
    _compare(z_pred, z_target, "none", dtype, torch.rand(2, device=device))


def test_equals_repa_projection_loss(device):
    """REPA's loop: per encoder and per sample, mean over tokens of -<normalize(z), normalize(z~)>,
    summed, divided by encoders * batch."""
    zs = [torch.randn(3, 10, 32, device=device), torch.randn(3, 10, 48, device=device)]
    zs_tilde = [torch.randn(3, 10, 32, device=device), torch.randn(3, 10, 48, device=device)]
    expected = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            expected += (-(F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1)).sum(-1)).mean()
    expected /= len(zs) * 3
    with kernels.use_backend("triton"):
        torch.testing.assert_close(kernels.alignment_loss(zs_tilde, zs), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_vectors_give_no_nan(dtype, device):
    p = leaf((2, 8, 64), dtype, device)
    q = torch.randn(2, 8, 64, device=device).to(dtype)
    with torch.no_grad():
        p[0, 3] = 0
    q[1, 2] = 0
    with kernels.use_backend("triton"):
        loss = kernels.alignment_loss(p, q, "none")
        loss.sum().backward()
    assert torch.isfinite(loss).all() and not torch.isnan(p.grad).any()
    # the reference gradient of a zero vector is q / (eps |q|) ~ 1e12, beyond fp16's range
    assert dtype == torch.float16 or torch.isfinite(p.grad).all()
    p.grad = None
    if dtype != torch.float16:  # fp16 cannot hold the reference's 1/eps gradient of a zero vector
        _compare(p, q, "none", dtype, torch.ones(2, device=device))


def test_half_precision_large_values_no_nan(device):
    """Squares of fp16 values above 256 overflow fp16; the kernel normalises in fp32."""
    p = (torch.randn(2, 4, 768, device=device) * 1000).half()
    q = (torch.randn(2, 4, 768, device=device) * 1000).half()
    with kernels.use_backend("triton"):
        loss = kernels.alignment_loss(p, q)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, kernels.reference_alignment_loss(p.float(), q.float()), atol=1e-5, rtol=1e-4)


def test_non_contiguous(device):
    p = torch.randn(2, 768, 9, device=device).transpose(1, 2).requires_grad_()
    q = torch.randn(2, 18, 768, device=device)[:, ::2]
    out = {}
    for backend in ("triton", "torch"):
        with kernels.use_backend(backend):
            loss = kernels.alignment_loss(p, q)
        loss.backward()
        out[backend] = [loss] + grads([p])
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b)


def test_identical_features_give_minus_one(device):
    z = torch.randn(2, 5, 72, device=device)
    with kernels.use_backend("triton"):
        torch.testing.assert_close(kernels.alignment_loss(z, 3 * z), torch.tensor(-1.0, device=device))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="must be equal"):
        kernels.alignment_loss(torch.randn(2, 4, 8), torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="equal, non-zero numbers"):
        kernels.alignment_loss([torch.randn(2, 4, 8)], [])
    with pytest.raises(TypeError):
        kernels.alignment_loss(torch.randn(2, 4, 8), [torch.randn(2, 4, 8)])
