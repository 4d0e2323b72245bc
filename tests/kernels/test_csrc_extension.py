"""The torch extension kernels._csrc (csrc/bindings.cpp) built on a machine without a GPU: it compiles
and links with warnings as errors, imports, takes every call kernels/_cuda.py makes (pybind11 raises
TypeError on a wrong argument count or type, so each op must reach bindings.cpp's own check instead),
and answers CPU tensors with a clear error rather than a crash. Built for sm_90a only (one arch keeps
the cold build near a minute; setup.py builds sm_80 too), cached by content hash."""
import shutil

import pytest
import torch

from kernels import _cuda

pytestmark = [
    pytest.mark.skipif(shutil.which("nvcc") is None and not (_cuda.CUDA_HOME / "bin" / "nvcc").exists(),
                       reason="nvcc is not installed"),
    pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU build (the extension needs CUDA headers)"),
]


@pytest.fixture(scope="module")
def extension():
    return _cuda.build_extension("9.0a")


@pytest.fixture
def lib(extension, monkeypatch):
    wrapped = _cuda.Extension(extension)
    monkeypatch.setattr(_cuda, "library", lambda family, device: wrapped)
    return wrapped


def test_size_queries_match_the_launchers(lib):
    assert lib.alignflow_adaln_max_width() == 4096
    assert lib.alignflow_adaln_supported(0, 0) == 1
    assert lib.alignflow_adaln_backward_tiles(2, 256) >= 1
    assert lib.alignflow_flow_chunks(8, 4096) >= 1 and lib.alignflow_flow_chunks(0, 4096) == 0
    assert lib.alignflow_adamw_vec(0) == 4 and lib.alignflow_adamw_vec(1) == 8
    assert lib.alignflow_adamw_chunk() > 0


def cpu(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


CALLS = {
    "adaln_forward": lambda: _cuda.adaln_forward(cpu(2, 4, 8), cpu(2, 4, 8), cpu(2, 8), cpu(2, 8), cpu(2, 8), 1e-6),
    "adaln_backward": lambda: _cuda.adaln_backward(
        cpu(2, 4, 8), cpu(2, 4, 8), cpu(2, 8), cpu(2, 8), cpu(2, 4), cpu(2, 4), cpu(2, 4, 8), cpu(2, 4, 8),
        True, True, True, True, torch.float32),
    "alignment_forward": lambda: _cuda.alignment_forward(cpu(2, 4, 8), cpu(2, 4, 8), 1e-8),
    "alignment_backward": lambda: _cuda.alignment_backward(cpu(2, 4), cpu(2, 4, 8), cpu(2, 4, 8), cpu(3, 8), True,
                                                           1e-8),
    "interpolant_forward": lambda: _cuda.interpolant_forward(cpu(2, 3, 4, 4), cpu(2, 3, 4, 4), cpu(2),
                                                             cpu(1, 3, 1, 1), cpu(2, 3, 4, 4), "linear"),
    "interpolant_backward": lambda: _cuda.interpolant_backward(cpu(2, 3, 16), cpu(2, 3, 16), cpu(2), (2, 3, 16),
                                                               "cosine", cpu(2, 3, 16), cpu(2, 3, 16), None, None),
    "velocity_forward": lambda: _cuda.velocity_forward(cpu(2, 3, 4, 4), cpu(2, 3, 4, 4), cpu(2, 3, 4, 4), cpu(2),
                                                       None, cpu(2, 3, 1, 1), "linear"),
    "velocity_backward": lambda: _cuda.velocity_backward(
        cpu(2, 3, 4, 4), cpu(2, 3, 4, 4), cpu(2, 3, 4, 4), cpu(2), cpu(2, 3, 4, 4), None, "linear", cpu(1),
        cpu(2, 3, 4, 4), cpu(2, 3, 16), cpu(2, 3, 16), None, None),
    "adamw_step": lambda: _cuda.adamw_step([cpu(8)], [cpu(8)], [cpu(8)], [cpu(8)], 1, 1e-3, (0.9, 0.999), 1e-8,
                                           0.01, cpu(1), None),
}


@pytest.mark.parametrize("op", sorted(CALLS))
def test_python_calls_match_the_bindings_and_cpu_tensors_are_refused(lib, op):
    with pytest.raises(RuntimeError, match="CUDA tensor") as error:
        CALLS[op]()
    assert "must be" in str(error.value).splitlines()[0], str(error.value)


def test_interpolant_backward_without_gradients_is_refused(extension):
    with pytest.raises(RuntimeError, match="got neither"):
        extension.interpolant_backward(None, None, cpu(2), None, None, None, None, 2, 3, 16, 0)
