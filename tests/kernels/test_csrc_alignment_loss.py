"""The CUDA C++ alignment loss (csrc/alignment_loss.cu) against reference_alignment_loss, run on the
CPU by the CUDA emulator (kernels.set_backend("cuda") with ALIGNFLOW_CUEMU=1); on a GPU the real
kernels. Outputs poisoned (NaN) before the kernels write them."""

import pytest
import torch

import kernels
from kernels import _cuda
from tests.kernels.csrc_fixtures import csrc_build  # noqa: F401 (autouse: emulator or fatbin)
from tests.helpers import assert_close, grads, leaf, poisoned_empty

# REPA's DINOv2-B width 768, an odd width (element loads), 1152, 4096, a single token
SHAPES = [(2, 3, 768), (2, 5, 100), (3, 7, 1152), (1, 2, 4096), (1, 1, 72)]


def _run(backend, pairs, reduction="none"):
    leaves = [t for pair in pairs for t in pair]
    with kernels.use_backend(backend), poisoned_empty():
        loss = kernels.alignment_loss([p for p, _ in pairs], [q for _, q in pairs], reduction=reduction)
        weights = torch.randn(loss.shape, dtype=loss.dtype, device=loss.device) if loss.dim() else None
        loss.backward(weights)
    return [loss] + grads(leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device):
    pairs = [(leaf(shape, dtype, device), leaf(shape, dtype, device)) for _ in range(2)]  # two encoders
    before = dict(_cuda.launches)
    torch.manual_seed(0)
    actual = _run("cuda", pairs)
    assert _cuda.launches["alignment_backward"] >= before.get("alignment_backward", 0) + 2, _cuda._logged
    torch.manual_seed(0)
    expected = _run("torch", pairs)
    for name, a, e in zip(["loss", "d_p0", "d_q0", "d_p1", "d_q1"], actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, dtype, name=name)


def test_zero_rows_and_frozen_target(device):
    """A zero prediction row (the clamp_min branch) and a target without grad (only dp is written)."""
    B, N, D = 2, 4, 128
    p = torch.randn(B, N, D, device=device)
    p[0, 1] = 0
    p.requires_grad_()
    q = torch.randn(B, N, D, device=device)
    results = {}
    for backend in ("cuda", "torch"):
        with kernels.use_backend(backend), poisoned_empty():
            loss = kernels.alignment_loss(p, q)
            loss.backward()
        results[backend] = [loss] + grads([p])
    for name, a, e in zip(["loss", "d_p"], results["cuda"], results["torch"]):
        assert_close(a, e, torch.float32, name=name)


def test_mixed_dtypes_fall_back_once(device, caplog):
    p, q = leaf((1, 2, 64), torch.bfloat16, device), leaf((1, 2, 64), torch.float32, device)
    _cuda._logged.clear()
    with caplog.at_level("WARNING", logger="kernels"), kernels.use_backend("cuda"):
        for _ in range(2):
            kernels.alignment_loss(p, q).backward()
    messages = [r.getMessage() for r in caplog.records if "alignment_loss" in r.getMessage()]
    assert messages == ['kernels.alignment_loss: the "cuda" backend runs the Triton kernel (z_pred torch.bfloat16 '
                        'with z_target torch.float32 (one dtype for both))'], messages
