"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with no register spills.

The compile runs in a subprocess without TRITON_INTERPRET: under the interpreter `@triton.jit`
functions cannot be compiled. It runs with the installed Triton and, where ALIGNFLOW_EXTRA_TRITON
names a `pip install --target` folder holding another release (CI puts Triton 3.6 there, the GPU
image's), with that one too: kernels must build under both."""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest
import triton

import kernels


def _compiler_env(release: str) -> dict:
    """The environment of a child that compiles with the installed Triton or ("extra") the one that
    ALIGNFLOW_EXTRA_TRITON names (skipped where it is not set)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if release == "extra":
        extra = os.environ.get("ALIGNFLOW_EXTRA_TRITON")
        if not extra:
            pytest.skip("ALIGNFLOW_EXTRA_TRITON is not set (CI sets it to a Triton 3.6 folder)")
        if not os.path.isdir(os.path.join(extra, "triton")):
            pytest.fail(f"ALIGNFLOW_EXTRA_TRITON={extra} holds no triton package")
        env["PYTHONPATH"] = os.pathsep.join([extra, os.getcwd(), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module", params=["installed", "extra"])
def aot_results(request, tmp_path_factory):
    env = _compiler_env(request.param)
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    run = subprocess.run([sys.executable, "-m", "kernels.aot", "--json", str(path)], env=env,
                         capture_output=True, text=True, timeout=1200)
    print(run.stdout[-5000:], run.stderr[-5000:])
    assert path.exists(), f"kernels.aot wrote no results: {run.stderr[-2000:]}"
    results = json.loads(path.read_text())
    if request.param == "extra":
        assert results["triton"] != triton.__version__, "the extra Triton was not the one used"
    return results["results"]


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


_JIT_MEASURE = """
import importlib, json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.aot import jit_build_problem, specialization

spec = next(s for s in importlib.import_module("kernels.interpolant").aot_specs()
            if s.name == "velocity_loss_fwd[bf16,path=1]")


def build(num_warps=spec.num_warps, **overrides):
    options = dict(num_warps=num_warps, num_stages=spec.num_stages)
    if "maxnreg" in overrides:
        options["maxnreg"] = overrides.pop("maxnreg")
    signature = {**spec.signature, **{name: "constexpr" for name in spec.constexprs}}
    return triton.compile(ASTSource(spec.fn, signature, {**spec.constexprs, **overrides}, specialization(spec)),
                          target=GPUTarget("cuda", 90, 32), options=options)


h200 = build()
capped = build(num_warps=1, BLOCK_S=1024, maxnreg=24)
print(json.dumps({"triton": triton.__version__, "h200": jit_build_problem(h200, 32),
                  "beyond_frame": jit_build_problem(h200, 36), "capped": jit_build_problem(capped, 0)}))
"""


@pytest.mark.parametrize("release", ["installed", "extra"])
def test_jit_builds_are_judged_by_the_aot_measure(release):
    """test_gpu_real_sizes judges the GPU's JIT builds by kernels.aot.jit_build_problem. The H200 run of
    2026-12-04 (Triton 3.6) read "8 spills, 32 registers" from Triton for velocity_loss_fwd (bf16, the
    cosine path): Triton's n_spills is the kernel's local memory in 4-byte words, and those 32 bytes are
    the stack frame libdevice's sin/cos keep for the slow argument reduction; nothing spills (the AOT
    check's measure). The same build, compiled here for sm_90, passes at 32 bytes; local memory beyond
    its frame, or a build capped to 24 registers that spills, is named."""
    run = subprocess.run([sys.executable, "-c", _JIT_MEASURE], env=_compiler_env(release), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert release == "installed" or found["triton"] != triton.__version__, "the extra Triton was not the one used"
    assert found["h200"] is None, found
    assert found["beyond_frame"].startswith("36 bytes of local memory, 32 of them its stack frame"), found
    assert found["capped"].startswith("spills ") and "(24 registers)" in found["capped"], found


@pytest.mark.parametrize("ptx, op, bits", [
    ("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n ld.global.b16 %rs1, [%rd2];", "ld", 128),
    ("@%p1 ld.global.nc.L1::evict_last.v2.b32 {%r1, %r2}, [%rd1];", "ld", 64),
    ("ld.global.b16 %rs1, [%rd2];\n st.global.v4.b32 [%rd3], {%r1, %r2, %r3, %r4};", "ld", 16),
    ("ld.global.b16 %rs1, [%rd2];\n st.global.v4.b32 [%rd3], {%r1, %r2, %r3, %r4};", "st", 128),
    ("ld.shared.v4.b32 {%r1, %r2, %r3, %r4}, [%r5];", "ld", 0),
])
def test_widest_global_access_is_read_from_ptx(ptx, op, bits):
    from kernels.aot import widest_access

    assert widest_access(ptx, op) == bits


def test_memory_bound_kernels_load_in_16_byte_vectors(aot_results):
    """At every width the JIT knows to be a multiple of 16 (D = 72 it does not: element-wise loads)."""
    import re

    for r in aot_results:
        width = int(re.search(r"D=(\d+)", r["name"]).group(1)) if "D=" in r["name"] else 0
        if r["name"].startswith(("adaln", "alignment")) and width % 16 == 0 and not r["error"]:
            assert r["load_bits"] >= 128, f"{r['name']} sm_{r['arch']}: widest load {r['load_bits']} bits"


def test_every_spec_names_each_kernel_argument_once():
    """A spec lists every argument of its kernel as typed or constexpr, and the divisibility hints land
    on the pointers and integers they name (hints are keyed by position among all the arguments)."""
    from kernels.aot import all_specs, specialization

    for _, spec in all_specs():
        names = list(spec.fn.arg_names)
        assert sorted(names) == sorted([*spec.signature, *spec.constexprs]), spec.name
        for (position,), _ in specialization(spec).items():
            kind = spec.signature.get(names[position])
            assert kind is not None and (kind.startswith("*") or kind.startswith("i")), (spec.name, names[position])


def test_specs_are_the_launchers_own_launches():
    """The adaLN, interpolant, alignment-loss, attention, GELU and MLP specs are recorded from their launchers
    (kernels._util.recorded_launches), so a launcher and its build cannot disagree: every kernel of those
    modules is built by some spec, and a launch that does not bind its kernel's arguments is refused,
    naming them."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from kernels._util import Launch, launch_spec

    for name in ("adaln", "interpolant", "alignment_loss", "attention", "gelu", "linear_gelu"):
        module = importlib.import_module(f"kernels.{name}")
        jitted = {fn for key, fn in vars(module).items()
                  if key.endswith("_kernel") and isinstance(fn, (JITFunction, InterpretedFunction))}
        built = {spec.fn for spec in module.aot_specs()}
        assert built == jitted, f"kernels/{name}.py: kernels without a spec: {[f.__name__ for f in jitted - built]}"
    module = importlib.import_module("kernels.alignment_loss")
    spec = next(s for s in module.aot_specs() if s.fn is module._alignment_fwd_kernel)
    assert spec.signature["stride_p_row"] == "i32" and spec.constexprs["stride_p_d"] == 1  # unit strides: constants
    fn = module._alignment_fwd_kernel
    with pytest.raises(ValueError, match=r"missing: \['stride_q_d'\]"):  # a launcher that dropped an argument
        launch_spec("x", Launch(fn, (1,), ("p", "q", "s", 8192, 768, 768, 1, 768), dict(EPS_=1e-12, COMPUTE=None,
                                                                                     BLOCK_R=4, BLOCK_D=1024)))
    with pytest.raises(ValueError, match=r"unknown: \['BLOCK_K'\]"):
        launch_spec("x", Launch(fn, (1,), (), dict(BLOCK_K=1)))


def _build(spec):
    return (spec.fn, spec.signature, spec.constexprs, spec.num_warps, spec.num_stages, sorted(spec.not_divisible))


@pytest.fixture
def interpreter_on(monkeypatch):
    """The public ops hand CPU tensors to their Triton launchers only under the interpreter
    (kernels._backend.interpreting() reads TRITON_INTERPRET when called). The CPU session sets it, the GPU
    machine does not; the tests below record the launches instead of running them, so they set it
    themselves and check the same builds on both."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("norm_dtype, tag", [(None, ""), ("float32", ",qk_norm"), ("bfloat16", ",qk_norm_bf16")])
def test_attention_specs_build_what_the_public_op_launches(monkeypatch, interpreter_on, norm_dtype, tag):
    """SiT-XL/2's attention_qkv call (bf16, d = 72, 16 heads, N = 256; qk-norm weights fp32 under
    autocast, bf16 in a bf16 model), made through the public op on a GPU target (the launchers take it
    as an argument), launches exactly the builds aot_specs() lists: the packed layout's head stride 72
    (not a multiple of 16) without the divisibility hint, unused qk-norm pointers typed as q, the bf16
    tiles of _GPU_CONFIGS. (A qk-norm variant's delta kernel is the plain one's build, listed once.)"""
    import torch
    import triton.language as tl

    from kernels._util import launch_spec, recorded_launches

    module = importlib.import_module("kernels.attention")
    monkeypatch.setattr(module, "launch_target", lambda q: "gpu_tf32")
    qkv = torch.empty(32, 256, 3 * 16 * 72, dtype=torch.bfloat16, requires_grad=True)
    norms = {}
    if norm_dtype is not None:
        names = ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")
        norms = {name: torch.randn(72, dtype=getattr(torch, norm_dtype)) for name in names}
    with recorded_launches(module) as launches:
        o = kernels.attention_qkv(qkv, 16, **norms)
        o.backward(torch.empty_like(o))
    specs = {spec.name: spec for spec in module.aot_specs()}
    assert len(launches) == len(module._AOT_KERNELS)
    for kernel, launch in zip(module._AOT_KERNELS, launches):
        expected = specs[f"{kernel}[bf16,d=72{'' if kernel == 'attention_bwd_delta' else tag}]"]
        assert _build(launch_spec(kernel, launch)) == _build(expected), kernel
    fwd = specs[f"attention_fwd[bf16,d=72{tag}]"]
    assert fwd.signature["qw_ptr"] == {None: "*bf16", "float32": "*fp32", "bfloat16": "*bf16"}[norm_dtype]
    assert {"stride_q_h", "stride_o_h"} <= set(fwd.not_divisible)
    assert "stride_q_n" not in fwd.not_divisible and fwd.constexprs["DOT"] == tl.bfloat16
    block_m, block_n, num_warps, num_stages = module._gpu_config("fwd", "half", norm_dtype is not None)
    assert (fwd.constexprs["BLOCK_M"], fwd.constexprs["BLOCK_N"], fwd.num_warps, fwd.num_stages) == (
        block_m, block_n, num_warps, num_stages)



@pytest.mark.parametrize("bias_grad", [True, False])
@pytest.mark.parametrize("width", [3072, 4608])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gelu_specs_build_what_the_public_op_launches(interpreter_on, dtype, width, bias_grad):
    """SiT's fc1 GELU (batch 32 x 256 tokens, N = 4 x hidden: SiT-B/2's 3072, SiT-XL/2's 4608) in bf16
    and fp32, with fc1's bias given its gradient and without a bias, made through the public op,
    launches exactly the build aot_specs() lists for its dtype and bias gradient: the backward's one
    kernel (the forward is torch's F.gelu), every integer argument a multiple of 16 at both widths."""
    import torch

    from kernels._util import launch_spec, recorded_launches

    module = importlib.import_module("kernels.gelu")
    a = torch.empty(32, 256, width, dtype=getattr(torch, dtype), requires_grad=True)
    bias = torch.zeros(width, requires_grad=True) if bias_grad else None
    with recorded_launches(module) as launches:
        g = kernels.gelu_tanh(a, bias)
        g.backward(torch.empty_like(g))
    specs = {spec.name: spec for spec in module.aot_specs()}
    (launch,) = launches
    expected = specs[f"gelu_tanh_bwd[{'bf16' if dtype == 'bfloat16' else 'fp32'}, bias_grad={bias_grad}]"]
    assert _build(launch_spec("gelu_tanh_bwd", launch)) == _build(expected)
    assert expected.signature["partial_ptr"] == ("*fp32" if bias_grad else expected.signature["da_ptr"])
    assert expected.not_divisible == () and expected.min_load_bits == 128


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_specs_build_what_the_real_size_runs_launch(interpreter_on, path):
    """test_gpu_real_sizes' interpolant and velocity-loss calls (SiT-XL/2 latents 32 x 4 x 32 x 32 in
    bf16, t in fp32, CAR-Flow's per-channel source shift and a full target shift, gradients for v_pred
    and both shifts), made through the public ops, launch exactly the builds aot_specs() lists: the AOT
    check compiles what the GPU's JIT compiles there (the H200's velocity-loss "spills" were in these
    builds: see test_jit_builds_are_judged_by_the_aot_measure)."""
    import torch

    from kernels._util import launch_spec, recorded_launches

    module = importlib.import_module("kernels.interpolant")
    x, noise, v_pred, mu1 = (torch.empty(32, 4, 32, 32, dtype=torch.bfloat16) for _ in range(4))
    mu0 = torch.empty(32, 4, 1, 1, dtype=torch.bfloat16, requires_grad=True)
    v_pred.requires_grad_()
    mu1.requires_grad_()
    t = torch.rand(32)
    with recorded_launches(module) as launches:
        x_t, v = kernels.interpolant(x, noise, t, path, mu0, mu1)
        torch.autograd.backward((x_t, v), (torch.empty_like(x_t), torch.empty_like(v)))
        kernels.velocity_loss(v_pred, x, noise, t, path, mu0, mu1).backward()
    specs = {spec.name: spec for spec in module.aot_specs()}
    names = ("interpolant_fwd", "interpolant_bwd", "velocity_loss_fwd", "velocity_loss_bwd")
    assert len(launches) == len(names)
    for name, launch in zip(names, launches):
        expected = specs[f"{name}[bf16,path={module._PATH_CODES[path]}]"]
        assert _build(launch_spec(name, launch)) == _build(expected), name


def test_attention_target_follows_the_interpreter_and_the_tf32_flag(monkeypatch):
    """The JIT call's target: the interpreter under TRITON_INTERPRET=1, else a GPU whose fp32 matmuls run
    TF32 where PyTorch's flag allows it; the fp32 specs ask for both, and a bad target is named."""
    import torch

    module = importlib.import_module("kernels.attention")

    class OnGPU:
        is_cuda = True

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set here: the GPU machine runs without it
    assert module.launch_target(OnGPU()) == "interpret"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.backends.cuda.matmul.allow_tf32 = True  # the conftest restores the flags after each test
    assert module.launch_target(OnGPU()) == "gpu_tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert module.launch_target(OnGPU()) == "gpu"
    specs = {spec.name: spec for spec in module.aot_specs()}
    assert specs["attention_fwd[fp32,d=72,ieee]"].constexprs["PRECISION"] == "ieee"
    assert specs["attention_fwd[fp32,d=72,tf32]"].constexprs["PRECISION"] == "tf32"
    assert specs["attention_bwd_dq[fp32,d=72,tf32]"].num_warps == module._GPU_CONFIGS["tf32"]["dq"][2]
    assert specs["attention_bwd_dq[fp32,d=72,ieee]"].num_warps == module._GPU_CONFIGS["fp32"]["dq"][2]
    with pytest.raises(ValueError, match="attention target must be one of interpret, gpu, gpu_tf32, got 'gpu-tf32'"):
        module._qkv_forward(torch.empty(1, 16, 3 * 64, device="meta"), 1, 0.125, None, "gpu-tf32")
