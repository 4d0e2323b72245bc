"""The fixture every CUDA C++ kernel test module imports: the emulated build on the CPU, the fatbin on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys

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


def ran_cuda(kinds, function):
    """Run `function`; assert that it launched each CUDA kernel of `kinds` (no silent fallback)."""
    before = dict(_cuda.launches)
    out = function()
    for kind in kinds:
        assert _cuda.launches[kind] > before.get(kind, 0), f"{kind} did not run: {_cuda._logged}"
    return out


def run_under_asan(script: str, family: str) -> None:
    """Run `script` in a child process with the AddressSanitizer build of csrc family `family` (the child
    preloads libasan; an out-of-bounds access fails it); the script prints "ok" last on success."""
    env = _cuda.asan_env(ALIGNFLOW_CUEMU="asan", TRITON_INTERPRET="1")
    _cuda.build_emulated(_cuda.SOURCES[family], asan=True)  # built here, so the child only loads it
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
