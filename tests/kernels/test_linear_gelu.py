"""kernels.linear_gelu (SiT's MLP with the GELU in fc1's matmul epilogue) against its reference
(CPU: Triton interpreter)."""
import importlib

import pytest
import torch

from tests.helpers import assert_close, leaf, poisoned_empty

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
    assert names == {f"linear_gelu_fwd[{t}, sm_{a}0 table]" for t in ("bf16", "fp32") for a in (8, 9)}
    for spec in specs:
        assert spec.not_divisible == (), spec.name
        arch = 9 if "sm_90" in spec.name else 8
        table = "half" if "bf16" in spec.name else "fp32"
        block_m, block_n, block_k, num_warps, num_stages = module._GPU_CONFIGS[arch][table]
        c = spec.constexprs
        assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], spec.num_warps, spec.num_stages) == (
            block_m, block_n, block_k, num_warps, num_stages), spec.name
        assert c["PRECISION"] == "tf32"
