"""The CUDA emulator (csrc/common/cuemu.h) on its own cases (csrc/tests/emulator_cases.cu): a legal
partial-warp kernel it must run clean in any thread order, and planted bugs it must report."""
import ctypes
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import _cuda

pytestmark = pytest.mark.skipif(_cuda.emulator_missing() is not None, reason=str(_cuda.emulator_missing()))
CASES = "tests/emulator_cases.cu"
ORDERS = {"forward": 0, "reverse": 1, "random": 2}


@pytest.fixture(scope="module")
def lib():
    lib = ctypes.CDLL(str(_cuda.build_emulated(CASES)))
    lib.alignflow_cuemu_error.restype = ctypes.c_char_p
    lib.alignflow_cuemu_configure.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_int]
    yield lib
    lib.alignflow_cuemu_configure(0, 0, 0)


def run(lib, case, values, out, blocks, threads, order="forward", seed=0):
    lib.alignflow_cuemu_configure(ORDERS[order], seed, 0)
    code = getattr(lib, f"case_{case}")(ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                        blocks, threads)
    return code, lib.alignflow_cuemu_error().decode()


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("threads", [48, 96, 1024])
def test_partial_warp_block_sum_runs_clean(lib, order, threads, _fresh_seed):
    """48 and 96 threads: the last warp has 16 lanes and shuffles with a 16-lane mask (legal)."""
    blocks = 5
    values = torch.randn(blocks * threads)
    out = torch.full((blocks,), float("nan"))
    assert run(lib, "block_sum", values, out, blocks, threads, order, seed=_fresh_seed) == (0, "")
    torch.testing.assert_close(out, values.view(blocks, threads).sum(1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("case, threads, message", [
    ("missing_barrier", 48, "shared-memory race on partial["),
    ("reused_buffer", 64, "shared-memory race on partial["),
    ("full_mask_partial_warp", 16, "mask 0xffffffff names lane 16, which this block of 16 threads does not have"),
    ("exited_lane", 32, "mask 0xffffffff names lane "),  # then: "which has exited" (below)
    ("divergent_barrier", 32, "__syncthreads at line"),
    ("deadlock", 2, "deadlock"),
])
def test_planted_bug_is_reported(lib, case, threads, message, order, _fresh_seed):
    values = torch.randn(4 * threads)
    out = torch.zeros(4 * threads)
    code, error = run(lib, case, values, out, 2, threads, order, seed=_fresh_seed)
    assert code == 719, (code, error)  # cudaErrorLaunchFailure
    assert message in error and f"{case}_kernel" in error, error
    if case == "exited_lane":
        assert "which has exited" in error, error


def test_barrier_on_two_lines_names_both(lib):
    code, error = run(lib, "divergent_barrier", torch.zeros(32), torch.zeros(32), 1, 32)
    source = (_cuda.CSRC / CASES).read_text().splitlines()
    start = next(i for i, text in enumerate(source) if "void divergent_barrier" in text)
    first, second = [i + 1 for i, text in enumerate(source) if i > start and "__syncthreads();" in text][:2]
    assert code == 719 and f"line {first}" in error and f"line {second}" in error, error


def test_read_outside_mask_is_nan(lib):
    values = torch.randn(32)
    out = torch.zeros(32)
    assert run(lib, "read_outside_mask", values, out, 1, 32) == (0, "")
    assert out[:16].isnan().all()
    torch.testing.assert_close(out[16:], values[16:])


def test_warp_ops_follow_cuda_semantics(lib):
    values = torch.randn(32)
    out = torch.zeros(6, 32)
    assert run(lib, "warp_ops", values, out, 1, 32) == (0, "")
    lane = torch.arange(32)
    up = torch.where(lane >= 3, lane - 3, lane)  # below the segment start: own value
    down = torch.where(lane % 16 + 5 < 16, lane + 5, lane)  # width 16
    torch.testing.assert_close(out[0], values[up])
    torch.testing.assert_close(out[1], values[down])
    torch.testing.assert_close(out[2], values[lane // 8 * 8 + 7])
    assert (out[3] == (values > 0).sum()).all()
    assert (out[4] == float((values > 2).any())).all() and (out[5] == 1).all()


def test_atomics_across_blocks(lib):
    values = torch.randn(64 * 128)
    out = torch.zeros(1)
    assert run(lib, "atomic_total", values, out, 64, 128) == (0, "")
    torch.testing.assert_close(out, values.sum().view(1), atol=1e-3, rtol=1e-4)


def test_invalid_launch_configuration(lib):
    code, error = run(lib, "block_sum", torch.zeros(2048), torch.zeros(1), 1, 2048)
    assert code == 9 and "invalid configuration" in error, (code, error)  # cudaErrorInvalidConfiguration


def test_address_sanitizer_names_the_kernel_line():
    """Built with -fsanitize=address, a write one past the output names the kernel's source line."""
    path = _cuda.build_emulated(CASES, asan=True)
    line = next(i + 1 for i, text in enumerate((_cuda.CSRC / CASES).read_text().splitlines())
                if "out[t + 1] = values[t];" in text)
    script = textwrap.dedent(f"""
        import ctypes, torch
        lib = ctypes.CDLL({str(path)!r})
        values, out = torch.zeros(32), torch.zeros(32)
        lib.case_out_of_bounds(ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(out.data_ptr()), 1, 32)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_cuda.asan_env(),
                         timeout=300)
    assert run.returncode != 0
    assert "heap-buffer-overflow" in run.stderr and f"emulator_cases.cu:{line}" in run.stderr, run.stderr[-3000:]
