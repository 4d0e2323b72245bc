"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with no register spills.

The compile runs in a subprocess without TRITON_INTERPRET: under the interpreter `@triton.jit`
functions cannot be compiled."""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import kernels


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kernels.aot", "--json", str(path)], env=env,
                         capture_output=True, text=True, timeout=1200)
    print(run.stdout[-5000:], run.stderr[-5000:])
    assert path.exists(), f"kernels.aot wrote no results: {run.stderr[-2000:]}"
    return json.loads(path.read_text())["results"]


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(aot_results):
    assert aot_results, "no AOT specs found"
    problems = [f"{r['name']} sm_{r['arch']}: {r['error'] or 'spills %d bytes' % r['spill_bytes']}"
                for r in aot_results if r["error"] or r["spill_bytes"]]
    assert not problems, "\n".join(problems)
    assert {r["arch"] for r in aot_results} == {80, 90}
    assert all(0 < r["registers"] <= 255 for r in aot_results)


def test_every_kernel_module_has_specs(aot_results):
    compiled_kernels = {r["name"].split("[")[0] for r in aot_results}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        if "@triton.jit" in open(module.__file__).read():
            specs = getattr(module, "aot_specs", lambda: [])()
            assert specs, f"kernels/{info.name}.py has Triton kernels but no aot_specs()"
            assert {s.name.split("[")[0] for s in specs} <= compiled_kernels
