"""Ahead-of-time compile check: every Triton kernel in `kernels/` for sm_80 and sm_90, no GPU needed.

    python -m kernels.aot [--arch 80 90] [--only NAME] [--json PATH]

Each kernel module lists the instances to build in `aot_specs()`. For each instance and target this
prints registers per thread and shared memory (read from the cubin with the `cuobjdump` shipped in
Triton's wheel), and the spill stores + loads and stack frame that the bundled `ptxas -v` reports for
the same PTX (a stack frame alone is not a spill: libdevice's sin/cos slow path keeps one). Exit status 1 on a compile error, on any spill, or when
an instance's `require_ptx` text (e.g. "wgmma" on sm_90) is missing from its PTX.
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels


@dataclass
class AotResult:
    name: str
    arch: int
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    load_bits: int | None = None      # widest global load (vector width x element bits)
    store_bits: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0


def all_specs():
    """(module name, spec) for every `aot_specs()` entry in the kernel modules."""
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "aot":
            continue
        module = importlib.import_module(f"kernels.{info.name}")
        for spec in getattr(module, "aot_specs", lambda: [])():
            yield info.name, spec


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def spill_report(ptx: str, arch: int) -> dict:
    """Spill stores/loads and stack frame in bytes, from `ptxas -v` on the kernel's PTX."""
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        run = subprocess.run([_tool("ptxas"), f"-arch=sm_{arch}{'a' if arch >= 90 else ''}", "-v", f.name,
                              "-o", os.devnull], capture_output=True, text=True, check=True)
    text = run.stdout + run.stderr
    match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if match is None:
        raise RuntimeError(f"no spill report in ptxas output: {text[-500:]}")
    stack, stores, loads = map(int, match.groups())
    return {"stack": stack, "spill": stores + loads}


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {key: int(value) for key, value in fields.items()}


def build_usage(compiled, arch: int) -> dict:
    """Registers, spill bytes (ptxas's spill stores + loads on its PTX, plus cuobjdump's LOCAL), stack
    frame and shared memory of one compiled kernel: an AOT build here, or a JIT build read back from
    Triton's cache on a GPU (both are CompiledKernels holding their PTX and cubin)."""
    usage = resource_usage(compiled.asm["cubin"])
    spills = spill_report(compiled.asm["ptx"], arch)
    return dict(registers=usage.get("REG"), spill_bytes=spills["spill"] + usage.get("LOCAL", 0),
                stack_bytes=spills["stack"], shared_bytes=compiled.metadata.shared)


def jit_build_problem(compiled, local_bytes: int) -> str | None:
    """Why a JIT build fails the AOT check's measure, or None. `local_bytes`: the local memory per
    thread that the driver reports for the loaded kernel (Triton's `n_spills` is that divided by 4, not
    a count of spills: a kernel calling libdevice's sin or cos keeps a 32-byte frame for the slow
    argument reduction, spills nothing, and reads "8 spills"). A problem is a spill store or load in
    the build's PTX, or local memory beyond the stack frame that ptxas gives it."""
    usage = build_usage(compiled, compiled.metadata.target.arch)
    problems = []
    if usage["spill_bytes"]:
        problems.append(f"spills {usage['spill_bytes']} bytes")
    if local_bytes > usage["stack_bytes"]:
        problems.append(f"{local_bytes} bytes of local memory, {usage['stack_bytes']} of them its stack frame")
    if not problems:
        return None
    return f"{', '.join(problems)} ({usage['registers']} registers)"


def widest_access(ptx: str, op: str) -> int:
    """Bits moved by the widest `ld.global` / `st.global` instruction in the PTX (0 if none)."""
    widest = 0
    for vector, bits in re.findall(rf"{op}\.global(?:\.[A-Za-z_0-9:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        widest = max(widest, int(vector or 1) * int(bits))
    return widest


def specialization(spec) -> dict:
    """Triton's divisibility attributes for `spec`, as the JIT derives them at the real shapes; keyed by
    the argument's position among all of the kernel's arguments (constexprs included)."""
    names = list(spec.fn.arg_names)
    return {(names.index(name),): [["tt.divisibility", 16]] for name, kind in spec.signature.items()
            if (kind.startswith("*") or kind in ("i32", "i64")) and name not in spec.not_divisible}


def compile_spec(spec, arch: int) -> AotResult:
    result = AotResult(spec.name, arch)
    signature = dict(spec.signature)
    signature.update({name: "constexpr" for name in spec.constexprs})
    try:
        compiled = triton.compile(ASTSource(spec.fn, signature, spec.constexprs, specialization(spec)),
                                  target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        usage = build_usage(compiled, arch)
    except Exception as error:  # report every kernel, then fail
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
        return result
    result.registers, result.spill_bytes = usage["registers"], usage["spill_bytes"]
    result.stack_bytes, result.shared_bytes = usage["stack_bytes"], usage["shared_bytes"]
    result.load_bits = widest_access(compiled.asm["ptx"], "ld")
    result.store_bits = widest_access(compiled.asm["ptx"], "st")
    problems = []
    if result.load_bits < spec.min_load_bits:
        problems.append(f"widest global load is {result.load_bits} bits, below the {spec.min_load_bits} asked for")
    problems += [f"PTX for sm_{arch} lacks {text!r}" for text in spec.require_ptx.get(arch, ())
                 if text not in compiled.asm["ptx"]]
    result.error = "; ".join(problems) or None
    return result


_JOBS: list = []


def _compile_job(index: int) -> AotResult:
    return compile_spec(*_JOBS[index])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--only", help="compile only specs whose name contains this text")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles run in parallel")
    args = parser.parse_args(argv)

    global _JOBS
    _JOBS = [(spec, arch) for _, spec in all_specs() if not args.only or args.only in spec.name
             for arch in args.arch]
    print(f"triton {triton.__version__}")
    print(f"{'kernel':<52} {'arch':>5} {'regs':>5} {'spill':>6} {'stack':>6} {'smem':>7} {'ld/st bits':>10}  status")
    if args.jobs > 1:  # forked workers inherit _JOBS: the JIT functions need no pickling
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_compile_job, range(len(_JOBS)), chunksize=1)
    else:
        results = [_compile_job(i) for i in range(len(_JOBS))]
    for r in results:
        status = "ok" if r.ok else (r.error or f"SPILLS {r.spill_bytes} bytes")
        print(f"{r.name:<52} sm_{r.arch:<2} {r.registers or '-':>5} {r.spill_bytes if r.spill_bytes is not None else '-':>6} "
              f"{r.stack_bytes if r.stack_bytes is not None else '-':>6} "
              f"{r.shared_bytes if r.shared_bytes is not None else '-':>7} "
              f"{f'{r.load_bits}/{r.store_bits}' if r.load_bits is not None else '-':>10}  {status}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "results": [asdict(r) for r in results]}, f, indent=1)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} compiled clean, {len(failed)} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
