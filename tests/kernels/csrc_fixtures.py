"""The fixture every CUDA C++ kernel test module imports: the emulated build on the CPU, the fatbin on a GPU."""
from __future__ import annotations

import os

import pytest

from kernels import _cuda


@pytest.fixture(autouse=True)
def csrc_build(monkeypatch, device):
    """On the CPU the kernels run under the emulator (skipped with the reason where it cannot be built);
    on a GPU the fatbin is built once unless ALIGNFLOW_CUDA_LIB names one."""
    if device.type == "cpu":
        if _cuda.emulator_missing():
            pytest.skip(_cuda.emulator_missing())
        monkeypatch.setenv("ALIGNFLOW_CUEMU", "1")
    elif "ALIGNFLOW_CUDA_LIB" not in os.environ and not (_cuda.CSRC / "build" / "libalignflow_cuda.so").exists():
        _cuda.build_fatbin()
