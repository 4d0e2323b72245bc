"""The CUDA C++ adaLN kernels (csrc/adaln.cu) against their references, run on the CPU by the CUDA
emulator: kernels.set_backend("cuda") with ALIGNFLOW_CUEMU=1 (on a GPU the same tests run the real
kernels, from the fatbin shared object). Outputs are poisoned (NaN) before the kernels write them."""
import os
import textwrap

import pytest
import torch

import kernels
from kernels import _cuda
from tests.kernels.csrc_fixtures import csrc_build, ran_cuda, run_under_asan  # noqa: F401 (csrc_build: autouse)
from tests.helpers import assert_all_close, assert_close, grads, leaf, poisoned_empty

# awkward widths (72: 9 vectors of 8 bf16; 100: the element-load path), SiT-XL's 1152, the widest
# row 4096, a single row
SHAPES = [(2, 3, 72), (2, 5, 100), (2, 33, 1152), (1, 2, 4096), (1, 1, 1152)]
DTYPES = [torch.float32, torch.bfloat16]
RESIDUAL_NAMES = ["x_new", "y", "d_x", "d_h", "d_gate", "d_shift", "d_scale"]
MODULATE_NAMES = ["y", "d_x", "d_shift", "d_scale"]


def _inputs(shape, dtype, device, mod_dtype=None):
    B, N, D = shape
    mod_dtype = mod_dtype or dtype
    x = leaf(shape, dtype, device)
    h = leaf(shape, mod_dtype, device)
    gate, shift, scale = (leaf((B, D) if N % 2 else (B, 1, D), mod_dtype, device, scale=0.5) for _ in range(3))
    g_x_new, dy = leaf(shape, dtype, device, False), leaf(shape, mod_dtype, device, False)
    return [x, h, gate, shift, scale], g_x_new, dy


def _residual(backend, tensors, g_x_new, dy, leaves=None):
    with kernels.use_backend(backend), poisoned_empty():
        x_new, y = kernels.adaln_residual_modulate(*tensors)
        torch.autograd.backward([x_new, y], [g_x_new, dy])
    return [x_new, y] + grads(tensors if leaves is None else leaves)


def _modulate(backend, tensors, dy):
    x, shift, scale = tensors
    with kernels.use_backend(backend), poisoned_empty():
        y = kernels.adaln_modulate(x, shift, scale)
        y.backward(dy)
    return [y] + grads([x, shift, scale])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_modulate(shape, dtype, device):
    tensors, g_x_new, dy = _inputs(shape, dtype, device)
    actual = ran_cuda(("adaln_forward", "adaln_backward"), lambda: _residual("cuda", tensors, g_x_new, dy))
    assert_all_close(actual, _residual("torch", tensors, g_x_new, dy), RESIDUAL_NAMES, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_modulate(shape, dtype, device):
    tensors, _, dy = _inputs(shape, dtype, device)
    tensors = [tensors[0], tensors[3], tensors[4]]
    actual = ran_cuda(("adaln_forward", "adaln_backward"), lambda: _modulate("cuda", tensors, dy))
    assert_all_close(actual, _modulate("torch", tensors, dy), MODULATE_NAMES, dtype)


@pytest.mark.parametrize("mod_dtype", [torch.bfloat16, torch.float16])
def test_residual_stream_in_fp32(mod_dtype, device):
    """x fp32 with bf16/fp16 h and modulation: x_new and d_x fp32, y and d_h in the modulation dtype."""
    tensors, g_x_new, dy = _inputs((2, 7, 1152), torch.float32, device, mod_dtype)
    actual = ran_cuda(("adaln_forward", "adaln_backward"), lambda: _residual("cuda", tensors, g_x_new, dy))
    expected = _residual("torch", tensors, g_x_new, dy)
    assert [t.dtype for t in actual[:4]] == [torch.float32, mod_dtype, torch.float32, mod_dtype]
    assert_close(actual[0], expected[0], torch.float32, name="x_new")
    assert_all_close(actual[1:], expected[1:], RESIDUAL_NAMES[1:], mod_dtype)


def test_sit_chunked_modulation(device):
    """SiT's shift/scale/gate are chunk() views of one (B, 6 D) projection: not contiguous, still the
    CUDA kernel (the launcher copies the (B, D) rows)."""
    B, N, D = 2, 4, 72
    base = leaf((B, 6 * D), torch.bfloat16, device, scale=0.5)
    x, h = leaf((B, N, D), torch.bfloat16, device), leaf((B, N, D), torch.bfloat16, device)
    g_x_new, dy = leaf((B, N, D), torch.bfloat16, device, False), leaf((B, N, D), torch.bfloat16, device, False)

    def run(backend):
        gate, shift, scale = base.chunk(6, dim=1)[:3]
        return _residual(backend, [x, h, gate, shift, scale], g_x_new, dy, leaves=[x, h, base])

    actual = ran_cuda(("adaln_forward", "adaln_backward"), lambda: run("cuda"))
    assert_all_close(actual, run("torch"), ["x_new", "y", "d_x", "d_h", "d_chunks"], torch.bfloat16)


def test_thread_order_does_not_change_a_bit(device):
    """Deterministic reductions: the emulator running threads in a shuffled order gives bitwise the
    same outputs and gradients (a race or an order-dependent sum would not)."""
    if device.type != "cpu":
        pytest.skip("thread order is an emulator option")
    tensors, g_x_new, dy = _inputs((2, 40, 1152), torch.float32, device)
    ordered = ran_cuda(("adaln_forward", "adaln_backward"), lambda: _residual("cuda", tensors, g_x_new, dy))
    lib = _cuda.library("adaln", device)
    lib.alignflow_cuemu_configure(2, int.from_bytes(os.urandom(4), "little"), 0)
    try:
        shuffled = _residual("cuda", tensors, g_x_new, dy)
    finally:
        lib.alignflow_cuemu_configure(0, 0, 0)
    for name, a, b in zip(RESIDUAL_NAMES, ordered, shuffled):
        assert torch.equal(a, b), name


def test_fallback_is_named_once(device, caplog):
    """fp64 has no CUDA kernel: the "cuda" backend runs Triton and says so once."""
    tensors, g_x_new, dy = _inputs((1, 3, 72), torch.float64, device)
    _cuda._logged.clear()
    with caplog.at_level("WARNING", logger="kernels"):
        for _ in range(2):
            _residual("cuda", tensors, g_x_new, dy)
    messages = [r.getMessage() for r in caplog.records if "CUDA kernel" in r.getMessage()]
    assert messages == ['kernels.adaln_residual_modulate: the "cuda" backend runs the Triton kernel (dtype '
                        'torch.float64 is not supported by the CUDA kernel)'], messages


def test_bias_runs_the_triton_kernel_and_says_so_once(device, caplog):
    """The CUDA C++ kernel takes no bias (model.fused_bias_grad): with one the "cuda" backend runs the
    Triton kernel, right (d_bias included), and logs the reason once; no CUDA launch."""
    B, N, D = 2, 3, 72
    tensors, g_x_new, dy = _inputs((B, N, D), torch.float32, device)
    bias = leaf((D,), torch.float32, device)
    _cuda._logged.clear()
    before = dict(_cuda.launches)
    with caplog.at_level("WARNING", logger="kernels"):
        for _ in range(2):
            actual = _residual("cuda", [*tensors, 1e-6, bias], g_x_new, dy, leaves=[*tensors, bias])
    assert dict(_cuda.launches) == before
    expected = _residual("torch", [*tensors, 1e-6, bias], g_x_new, dy, leaves=[*tensors, bias])
    assert_all_close(actual, expected, RESIDUAL_NAMES + ["d_bias"], torch.float32)
    messages = [r.getMessage() for r in caplog.records if "CUDA C++ kernel" in r.getMessage()]
    assert messages == ['kernels.adaln_residual_modulate: the "cuda" backend runs the Triton kernel (a bias (the '
                        "Linear's, for its gradient in this pass): the CUDA C++ kernel takes none)"], messages


def test_address_sanitizer_run(tmp_path):
    """The residual op forward and backward in an AddressSanitizer build of the emulated kernels: any
    out-of-bounds access of the kernels fails the run (the process preloads libasan)."""
    if _cuda.emulator_missing():
        pytest.skip(_cuda.emulator_missing())
    script = textwrap.dedent("""
        import os, torch, kernels
        from kernels import _cuda
        kernels.set_backend("cuda")
        for D in (72, 100, 1152):
            x, h = torch.randn(2, 3, D, requires_grad=True), torch.randn(2, 3, D, requires_grad=True)
            gate, shift, scale = (torch.randn(2, D, requires_grad=True) for _ in range(3))
            x_new, y = kernels.adaln_residual_modulate(x, h, gate, shift, scale)
            (x_new.sum() + y.square().sum()).backward()
            ref = kernels.reference_adaln_residual_modulate(x, h, gate, shift, scale)[1]
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        assert _cuda.launches["adaln_backward"] == 3, _cuda.launches
        print("ok")
    """)
    run_under_asan(script, "adaln")
