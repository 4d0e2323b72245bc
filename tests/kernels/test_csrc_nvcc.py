"""nvcc builds of csrc/*.cu for sm_80 and sm_90a, no GPU needed: warnings (host, device and ptxas
spill / local-memory warnings) are errors; every kernel has zero spills and no stack frame; the
vectorised instances (VEC > 1 in their template arguments) load rows with 128-bit global loads only,
read from the SASS through the cuobjdump bundled with Triton. Builds are cached by content hash."""
import os
import re
import shutil
import subprocess

import pytest
import triton

from kernels import _cuda

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None and not (_cuda.CUDA_HOME / "bin" / "nvcc").exists(),
                                reason="nvcc is not installed")
ARCHS = ["sm_80", "sm_90a"]
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def ptxas_report(text):
    """{kernel: (registers, stack bytes, spill bytes)} from `ptxas -v`."""
    out = {}
    for block in text.split("Compiling entry function '")[1:]:
        name = block.split("'", 1)[0]
        stack, stores, loads = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                                  r"(\d+) bytes spill loads", block).groups())
        registers = int(re.search(r"Used (\d+) registers", block).group(1))
        out[name] = (registers, stack, stores + loads)
    return out


def sass_loads(cubin):
    """{kernel: [global load opcodes]} from the cubin's SASS."""
    sass = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    out = {}
    for block in sass.split("Function : ")[1:]:
        name = block.split(None, 1)[0]
        out[name] = re.findall(r"\bLDG\.E[.A-Z0-9]*", block)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(set(_cuda.SOURCES.values())))
def test_cubin_builds_clean_with_no_spills(source, arch):
    cubin, report = _cuda.build_cubin(source, arch)
    kernels = ptxas_report(report)
    assert kernels, report[-2000:]
    for name, (registers, stack, spill) in kernels.items():
        print(f"{arch} {name}: {registers} registers, {stack} B stack, {spill} B spill")
        assert stack == 0 and spill == 0, (name, stack, spill)
    loads = sass_loads(cubin)
    assert set(loads) == set(kernels)
    vectorised = {name: ops for name, ops in loads.items() if (m := re.search(r"kernelI.*?Li(\d+)E", name))
                  and int(m.group(1)) > 1}
    assert vectorised, sorted(loads)
    for name, ops in vectorised.items():
        # row data in 16-byte words; 32-bit loads only for the fp32 per-row statistics
        assert "LDG.E.128.CONSTANT" in ops or "LDG.E.128" in ops, (name, ops)
        assert not any(".U16" in op or ".64" in op for op in ops), (name, ops)
