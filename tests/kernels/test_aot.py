"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with no register spills."""
import importlib

import pytest

aot = importlib.import_module("kernels.aot")
SPECS = list(aot.all_specs())


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=[s.name for _, s in SPECS])
def test_compiles_without_spills(spec, arch):
    result = aot.compile_spec(spec, arch)
    assert result.error is None, result.error
    assert result.spill_bytes == 0, f"{spec.name} spills {result.spill_bytes} bytes on sm_{arch}"
    assert result.registers and result.registers <= 255


def test_every_kernel_module_has_specs():
    import pkgutil

    import kernels

    modules = {m for m, _ in SPECS}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        source = open(module.__file__).read()
        if "@triton.jit" in source:
            assert info.name in modules, f"kernels/{info.name}.py has Triton kernels but no aot_specs()"
