"""The "cuda" backend: CUDA C++ kernels of csrc/ called through their C launchers (ctypes).

Where the launchers come from:
- CUDA tensors: the kernels._csrc extension where setup.py built it (csrc/bindings.cpp: the current
  stream and device guard of torch), else the torch-independent fatbin shared object of every
  csrc/*.cu (sm_80 + sm_90a), `ALIGNFLOW_CUDA_LIB` or csrc/build/libalignflow_cuda.so
  (`python -m kernels.cuda_build --fatbin`);
- CPU tensors with ALIGNFLOW_CUEMU=1 (the tests): the same sources built with g++ and
  -DALIGNFLOW_CUEMU, i.e. run by the CUDA emulator of csrc/common/cuemu.h, one shared object per
  source, cached by content hash under ~/.cache/alignflow/cuemu (ALIGNFLOW_CACHE moves it).

`takes(op, ...)` says whether an op's call can run here and, where not, logs once which op falls back
to its Triton kernel and why.
"""
from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ._backend import CUDA_OPS, get_backend

log = logging.getLogger("kernels")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
# torch's nvcc defines: they remove bf16/half implicit conversions and operators, so code that builds
# in the emulator builds the same way in a torch extension
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
EMULATOR_FLAGS = ["-std=c++20", "-O2", "-g", "-fPIC", "-shared", "-fno-strict-aliasing", "-DALIGNFLOW_CUEMU",
                  "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-Wno-unused-parameter",
                  *TORCH_NVCC_DEFINES]
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1"]
# sm_90a through -gencode: nvcc 13.0's -arch=sm_90a shorthand rejects wgmma
GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xcompiler=-fPIC", "-Werror=all-warnings",
              "-Xcompiler=-Wall,-Werror", "-Xptxas=-warn-spills,-warn-lmem-usage", *TORCH_NVCC_DEFINES]
SOURCES = {"adaln": "adaln.cu", "alignment": "alignment_loss.cu", "flow": "interpolant.cu", "adamw": "adamw.cu"}  # csrc file of each kernel family (setup.py builds every csrc/*.cu)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNFLOW_CACHE", Path.home() / ".cache" / "alignflow"))


def _digest(paths, flags, tool) -> str:
    h = hashlib.sha256()
    version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    for part in (version, " ".join(flags)):
        h.update(part.encode())
    for path in sorted(paths):
        h.update(str(path.relative_to(CSRC)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def _headers():
    return sorted((CSRC / "common").glob("*.h"))


def _compile(command, output: Path):
    """Run a compiler into a temporary file, then move it into place (a concurrent build is harmless)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        target = Path(tmp) / output.name
        run = subprocess.run([*command, "-o", str(target)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"building {output.name} failed:\n{' '.join(command)}\n{run.stdout}{run.stderr}")
        os.replace(target, output)
    return run


def emulator_missing(compiler: str = "g++") -> str | None:
    """Why the emulated build cannot run here (no host compiler, no CUDA headers), or None."""
    if shutil.which(compiler) is None:
        return f"{compiler} not found"
    if not (CUDA_HOME / "include" / "cuda_bf16.h").exists():
        return f"no CUDA headers under {CUDA_HOME / 'include'} (set CUDA_HOME)"
    return None


def build_emulated(source: str, asan: bool = False, compiler: str = "g++") -> Path:
    """The emulated shared object of csrc/<source> (built once per content hash; returns its path)."""
    flags = EMULATOR_FLAGS + (ASAN_FLAGS if asan else [])
    path = CSRC / source
    digest = _digest([path, *_headers()], flags, compiler)
    output = cache_dir() / "cuemu" / f"{path.stem}-{'asan-' if asan else ''}{digest}.so"
    if not output.exists():
        start = time.perf_counter()
        _compile([compiler, *flags, f"-I{CSRC}", f"-I{CUDA_HOME / 'include'}", "-x", "c++", str(path),
                  "-x", "none", "-lpthread"], output)
        log.info("built %s in %.1f s", output.name, time.perf_counter() - start)
    return output


def asan_runtime(compiler: str = "g++") -> str:
    """LD_PRELOAD for a Python that loads an ASan-built object: the AddressSanitizer runtime, and
    libstdc++ beside it (else ASan's __cxa_throw interceptor aborts the first C++ exception, which
    Triton's import throws)."""
    return " ".join(subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True,
                                   check=True).stdout.strip() for name in ("libasan.so", "libstdc++.so.6"))


# AddressSanitizer's run-time options for every process that loads an ASan build, fixed rather than
# left to the runtime's defaults, which differ between releases: detect_stack_use_after_return is off
# in GCC 12's libasan and on in GCC 13's (the GPU image's), and the emulator's fiber switches must
# hold under both. No leak check (Python and torch keep allocations to exit); protect_shadow_gap=0
# because the CUDA driver maps memory in ASan's shadow gap (cuInit fails otherwise).
ASAN_OPTIONS = "detect_leaks=0:detect_stack_use_after_return=1:protect_shadow_gap=0"


def asan_env(compiler: str = "g++", **variables: str) -> dict:
    """The environment of a child process that loads an ASan build: this one's, plus the runtime
    preloaded (asan_runtime), ASAN_OPTIONS, and `variables`."""
    return dict(os.environ, LD_PRELOAD=asan_runtime(compiler), ASAN_OPTIONS=ASAN_OPTIONS, **variables)


def nvcc() -> str:
    found = shutil.which("nvcc") or str(CUDA_HOME / "bin" / "nvcc")
    if not Path(found).exists():
        raise RuntimeError("nvcc not found (put CUDA's bin on PATH or set CUDA_HOME)")
    return found


def build_cubin(source: str, arch: str, out_dir: Path | None = None) -> tuple[Path, str]:
    """nvcc's cubin of csrc/<source> for one `-gencode` target (e.g. "sm_90a"), warnings as errors;
    returns (cubin path, ptxas -v report). Cached by content hash."""
    compute = arch.replace("sm_", "compute_")
    flags = [*NVCC_FLAGS, f"-gencode=arch={compute},code={arch}", "-Xptxas=-v"]
    path = CSRC / source
    digest = _digest([path, *_headers()], flags, nvcc())
    out_dir = out_dir or cache_dir() / "cubin"
    output = out_dir / f"{path.stem}-{arch}-{digest}.cubin"
    report = output.with_suffix(".ptxas.txt")
    if not output.exists() or not report.exists():
        run = _compile([nvcc(), *flags, f"-I{CSRC}", "-cubin", str(path)], output)
        report.write_text(run.stdout + run.stderr)
    return output, report.read_text()


def build_fatbin(output: Path | None = None) -> Path:
    """One torch-independent shared object with every csrc/*.cu's launchers for sm_80 and sm_90a:
    what travels to a GPU machine whose torch differs from ours."""
    output = output or CSRC / "build" / "libalignflow_cuda.so"
    sources = sorted(CSRC.glob("*.cu"))
    _compile([nvcc(), *NVCC_FLAGS, *GENCODE, "-shared", f"-I{CSRC}", "-cudart=static", *map(str, sources)], output)
    for key in [k for k, v in _libraries.items() if isinstance(v, str)]:
        del _libraries[key]  # "not built" no longer holds
    return output


def extension_flags() -> dict:
    """setup.py's flags for kernels._csrc (csrc/extension_flags.json) plus warnings as errors."""
    flags = json.loads((CSRC / "extension_flags.json").read_text())
    return {"arch_list": flags["arch_list"], "cxx": [*flags["cxx"], "-Wall", "-Werror"],
            "nvcc": [*flags["nvcc"], "-Werror=all-warnings", "-Xcompiler=-Wall,-Werror"]}


def build_extension(arch_list: str | None = None):
    """The kernels._csrc extension of setup.py (csrc/bindings.cpp + every csrc/*.cu, setup.py's flags
    plus warnings as errors) built by torch.utils.cpp_extension for TORCH_CUDA_ARCH_LIST=arch_list
    (default: setup.py's), cached by a hash of the sources, flags, nvcc and torch under the cache dir; returns the module.
    Needs nvcc and a CUDA build of torch, not a GPU."""
    from torch.utils import cpp_extension
    config = extension_flags()
    arch_list = arch_list or config["arch_list"]
    sources = [CSRC / "bindings.cpp", *sorted(CSRC.glob("*.cu"))]
    flags = [arch_list, torch.__version__, *config["cxx"], *config["nvcc"]]
    directory = cache_dir() / "extension" / _digest([*sources, *_headers()], flags, nvcc())
    built = directory / "_csrc.so"
    if built.exists():  # by content hash: ninja would rebuild a fresh checkout's newer mtimes
        import importlib.util
        spec = importlib.util.spec_from_file_location("_csrc", built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    directory.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST"), cpp_extension.CUDA_HOME
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    cpp_extension.CUDA_HOME = str(CUDA_HOME)  # else torch guesses it from nvcc's path (/usr/local here)
    try:
        return cpp_extension.load("_csrc", [str(p) for p in sources], extra_include_paths=[str(CSRC)],
                                  extra_cflags=config["cxx"], extra_cuda_cflags=config["nvcc"],
                                  build_directory=str(directory))
    finally:
        if saved[0] is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved[0]
        cpp_extension.CUDA_HOME = saved[1]


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

_libraries: dict = {}
_logged: set = set()
P = ctypes.c_void_p
I = ctypes.c_int


def _declare(lib):
    """ctypes signatures of the launchers a library has (an emulated object holds one family)."""
    L, F = ctypes.c_longlong, ctypes.c_float
    signatures = {
        "alignflow_adaln_supported": [I, I], "alignflow_adaln_max_width": [], "alignflow_adaln_backward_tiles": [I, I],
        "alignflow_adaln_forward": [P] * 9 + [I, I, I, F, I, I, P],
        "alignflow_adaln_backward": [P] * 12 + [I] * 7 + [P],
        "alignflow_alignment_supported": [I, I], "alignflow_alignment_forward": [P, P, P, L, I, F, I, P],
        "alignflow_alignment_backward": [P] * 6 + [L, I, F, I, P],
        "alignflow_velocity_supported": [I, I], "alignflow_flow_chunks": [L, L],
        "alignflow_interpolant_forward": [P] * 5 + [L, L] + [P] * 2 + [L, L] + [P] * 2 + [L] * 3 + [I, I, P],
        "alignflow_interpolant_backward": [P] * 7 + [L] * 3 + [I, I, P],
        "alignflow_velocity_forward": [P] * 6 + [L, L] + [P] * 2 + [L, L] + [P] + [L] * 3 + [I] * 3 + [P],
        "alignflow_velocity_backward": [P] * 6 + [L, L] + [P] * 2 + [L, L] + [P] * 6 + [L] * 3 + [I] * 3 + [P],
        "alignflow_adamw_chunk": [], "alignflow_adamw_vec": [I],
        "alignflow_adamw_step": [P, P, I, P, I] + [F] * 7 + [P, I, P],
    }
    for name, argtypes in signatures.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = I
    if hasattr(lib, "alignflow_cuemu_error"):
        lib.alignflow_cuemu_error.restype = ctypes.c_char_p
        lib.alignflow_cuemu_configure.argtypes = [I, ctypes.c_uint, I]
    return lib


def emulating() -> bool:
    """ALIGNFLOW_CUEMU=1 runs the "cuda" backend on CPU tensors in the emulator; =asan builds it with
    AddressSanitizer (the process must preload libasan: tests/kernels/test_csrc_adaln.py shows how)."""
    return os.environ.get("ALIGNFLOW_CUEMU", "0") not in ("", "0")


# launches per kernel family, so tests can tell that the CUDA kernel ran rather than a fallback
launches: collections.Counter = collections.Counter()


def _key(family: str, device: torch.device):
    return family, device.type, os.environ.get("ALIGNFLOW_CUEMU"), os.environ.get("ALIGNFLOW_CUDA_LIB")


def library(family: str, device: torch.device):
    """The loaded launchers of a kernel family for tensors on `device`; raises with the reason."""
    key = _key(family, device)
    if isinstance(_libraries.get(key), str):
        raise RuntimeError(_libraries[key])  # known unavailable: not looked for again at every call
    if key not in _libraries:
        if device.type == "cpu":
            if not emulating():
                raise RuntimeError("CPU tensors: set ALIGNFLOW_CUEMU=1 to run the CUDA kernels in the emulator")
            path = build_emulated(SOURCES[family], asan=os.environ["ALIGNFLOW_CUEMU"] == "asan")
        else:
            extension = _extension()
            if extension is not None:
                _libraries[key] = extension
                return extension
            path = Path(os.environ.get("ALIGNFLOW_CUDA_LIB", CSRC / "build" / "libalignflow_cuda.so"))
            if not path.exists():
                raise RuntimeError(f"neither the kernels._csrc extension (setup.py with ALIGNFLOW_BUILD_CUDA=1) nor "
                                   f"{path} is built (python -m kernels.cuda_build --fatbin)")
        _libraries[key] = _declare(ctypes.CDLL(str(path)))
    return _libraries[key]


class Extension:
    """kernels._csrc (csrc/bindings.cpp) under the launchers' C names for the size queries."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        return getattr(self.module, name.removeprefix("alignflow_"))


def _extension():
    if os.environ.get("ALIGNFLOW_CUDA_LIB"):
        return None  # an explicit fatbin object wins
    try:
        from . import _csrc
    except (ImportError, OSError):  # not built, or built against another CUDA/torch
        return None
    return Extension(_csrc)


NO_TRITON_KERNEL = ("adamw_step",)  # ops whose caller runs the PyTorch reference where the CUDA kernel does not


def _fall_back(op: str, reason: str) -> bool:
    if (op, reason) not in _logged:
        _logged.add((op, reason))
        instead = "the PyTorch reference" if op in NO_TRITON_KERNEL else "the Triton kernel"
        log.warning("kernels.%s: the \"cuda\" backend runs %s (%s)", op, instead, reason)
    return False


def takes(op: str, tensors, contiguous=()) -> bool:
    """True when the active backend is "cuda" and op's CUDA C++ kernel can run these inputs (the
    `contiguous` ones must be: the kernels read rows as raw memory)."""
    if get_backend() != "cuda":
        return False
    assert op in CUDA_OPS, op
    tensors = [t for t in tensors if t is not None]
    device = tensors[0].device
    try:
        library(FAMILY[op], device)
    except (RuntimeError, OSError) as error:
        _libraries.setdefault(_key(FAMILY[op], device), str(error).splitlines()[0])
        return _fall_back(op, str(error).splitlines()[0])
    for t in tensors:
        if t.dtype not in DTYPE_CODES:
            return _fall_back(op, f"dtype {t.dtype} is not supported by the CUDA kernel")
    for t in contiguous:
        if t is not None and not t.is_contiguous():
            return _fall_back(op, f"a non-contiguous input of shape {tuple(t.shape)} (strides {t.stride()})")
    return True


def check(lib, code: int, what: str):
    if code != 0:
        detail = lib.alignflow_cuemu_error().decode() if hasattr(lib, "alignflow_cuemu_error") else ""
        raise RuntimeError(f"{what}: CUDA error {code}{': ' + detail if detail else ''}")


def _rows(v, B, D):
    """A (B, D) or (B, 1, D) modulation vector as contiguous (B, D) rows (SiT's are chunks of one
    (B, 6 D) projection: a small copy)."""
    return None if v is None else v.reshape(B, D).contiguous()


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _stream(device):
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------
# Ops (the same signatures as the Triton launch helpers they replace)
# ------------------------------------------------------------------------------------------------

FAMILY = {"adaln_modulate": "adaln", "adaln_residual_modulate": "adaln", "alignment_loss": "alignment",
          "interpolant": "flow", "velocity_loss": "flow", "adamw_step": "adamw"}


def adaln_forward(x, h, gate, shift, scale, eps):
    """kernels.adaln._forward on the CUDA kernel: (x_new or None, y, mean, rstd)."""
    lib = library("adaln", x.device)
    B, N, D = x.shape
    mod_dtype = torch.promote_types(shift.dtype, scale.dtype)
    others = [t for t in (h, gate, shift, scale) if t is not None]
    if any(t.dtype != mod_dtype for t in others) or not lib.alignflow_adaln_supported(
            DTYPE_CODES[x.dtype], DTYPE_CODES[mod_dtype]):
        raise NotImplementedError  # the caller checked with `supports_adaln`
    gate, shift, scale = (_rows(t, B, D) for t in (gate, shift, scale))
    y = torch.empty((B, N, D), dtype=mod_dtype, device=x.device)
    x_new = torch.empty_like(x) if h is not None else None
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if isinstance(lib, Extension):
        lib.module.adaln_forward(x, h, gate, shift, scale, x_new, y, mean, rstd, float(eps))
    else:
        code = lib.alignflow_adaln_forward(_ptr(x), _ptr(h), _ptr(gate), _ptr(shift), _ptr(scale), _ptr(x_new),
                                           _ptr(y), _ptr(mean), _ptr(rstd), B, N, D, float(eps), DTYPE_CODES[x.dtype],
                                           DTYPE_CODES[mod_dtype], _stream(x.device))
        check(lib, code, "alignflow_adaln_forward")
    launches["adaln_forward"] += 1
    return x_new, y, mean, rstd


def unavailable(family: str, device: torch.device) -> str | None:
    """None when the CUDA kernels of `family` can run on `device`, else why not (bench variants)."""
    try:
        library(family, device)
    except (RuntimeError, OSError) as error:
        return str(error).splitlines()[0]
    return None


def launched(fn, kind: str):
    """`fn` that raises when a call did not launch the CUDA kernel `kind` (a fallback must not be timed
    as the CUDA kernel)."""
    def run():
        before = launches[kind]
        out = fn()
        if launches[kind] == before:
            raise RuntimeError(f"the CUDA kernel {kind} did not run (the log names the fallback)")
        return out
    return run


def supports_adaln(op, x, h, gate, shift, scale, bias=None) -> bool:
    """`takes` plus the kernel's own limits: one modulation dtype, a supported dtype pair, no bias."""
    if not takes(op, (x, h, gate, shift, scale), contiguous=(x, h)):
        return False
    if bias is not None:
        return _fall_back(op, "a bias (the Linear's, for its gradient in this pass): the CUDA C++ kernel "
                              "takes none")
    lib = library("adaln", x.device)
    mod_dtype = torch.promote_types(shift.dtype, scale.dtype)
    if any(t is not None and t.dtype != mod_dtype for t in (h, gate, shift, scale)):
        return _fall_back(op, "h, gate, shift and scale of different dtypes")
    if not lib.alignflow_adaln_supported(DTYPE_CODES[x.dtype], DTYPE_CODES[mod_dtype]):
        return _fall_back(op, f"x {x.dtype} with modulation {mod_dtype}")
    if x.shape[-1] > lib.alignflow_adaln_max_width():
        return _fall_back(op, f"D = {x.shape[-1]} exceeds {lib.alignflow_adaln_max_width()}")
    return True


def adaln_backward(x, h, gate, scale, mean, rstd, dy, g_x_new, need_dx, need_dh, need_modulation, need_gate,
                   x_grad_dtype):
    """kernels.adaln._backward on the CUDA kernel: (dx, dh, d_shift, d_scale, d_gate)."""
    lib = library("adaln", x.device)
    B, N, D = x.shape
    assert x_grad_dtype == x.dtype and mean.dtype == torch.float32
    mod_dtype = scale.dtype
    gate, scale = _rows(gate, B, D), _rows(scale, B, D)
    dy = dy.to(mod_dtype).contiguous()
    g_x_new = g_x_new.to(x.dtype).contiguous() if g_x_new is not None else None
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device) if need_dx else None
    dh = torch.empty((B, N, D), dtype=h.dtype, device=x.device) if need_dh else None
    sums = partial = None
    if need_modulation or need_gate:
        tiles = lib.alignflow_adaln_backward_tiles(B, N)
        partial = torch.empty((B, tiles, 3, D), dtype=torch.float32, device=x.device)
        sums = torch.empty((B, 3, D), dtype=torch.float32, device=x.device)
    if isinstance(lib, Extension):
        lib.module.adaln_backward(x, h, gate, scale, mean, rstd, dy, g_x_new, dx, dh, partial, sums,
                                  bool(need_modulation), bool(need_gate))
    else:
        code = lib.alignflow_adaln_backward(
            _ptr(x), _ptr(h), _ptr(gate), _ptr(scale), _ptr(mean), _ptr(rstd), _ptr(dy), _ptr(g_x_new), _ptr(dx),
            _ptr(dh), _ptr(partial), _ptr(sums), B, N, D, int(need_modulation), int(need_gate), DTYPE_CODES[x.dtype],
            DTYPE_CODES[mod_dtype], _stream(x.device))
        check(lib, code, "alignflow_adaln_backward")
    launches["adaln_backward"] += 1
    d_shift = sums[:, 0] if need_modulation else None
    d_scale = sums[:, 1] if need_modulation else None
    d_gate = sums[:, 2] if need_gate else None
    return dx, dh, d_shift, d_scale, d_gate


def supports_alignment(p, q) -> bool:
    if not takes("alignment_loss", (p, q), contiguous=(p, q)):
        return False
    lib = library("alignment", p.device)
    if not lib.alignflow_alignment_supported(DTYPE_CODES[p.dtype], DTYPE_CODES[q.dtype]):
        return _fall_back("alignment_loss", f"z_pred {p.dtype} with z_target {q.dtype} (one dtype for both)")
    return True


def alignment_forward(p, q, eps):
    """kernels.alignment_loss._alignment_forward on the CUDA kernel: (cos (B, N), stats (3, B N))."""
    lib = library("alignment", p.device)
    B, N, D = p.shape
    stats = torch.empty((3, B * N), dtype=torch.float32, device=p.device)
    if isinstance(lib, Extension):
        lib.module.alignment_forward(p, q, stats, float(eps))
    else:
        code = lib.alignflow_alignment_forward(_ptr(p), _ptr(q), _ptr(stats), B * N, D, float(eps),
                                               DTYPE_CODES[p.dtype], _stream(p.device))
        check(lib, code, "alignflow_alignment_forward")
    launches["alignment_forward"] += 1
    return stats[0].view(B, N).clone(), stats


def alignment_backward(g_cos, p, q, stats, need_dq, eps):
    """kernels.alignment_loss._alignment_backward on the CUDA kernel: (dp, dq or None)."""
    lib = library("alignment", p.device)
    B, N, D = p.shape
    g = g_cos.reshape(B * N).float().contiguous()
    dp = torch.empty_like(p)
    dq = torch.empty_like(q) if need_dq else None
    if isinstance(lib, Extension):
        lib.module.alignment_backward(p, q, stats, g, dp, dq, float(eps))
    else:
        code = lib.alignflow_alignment_backward(_ptr(p), _ptr(q), _ptr(stats), _ptr(g), _ptr(dp), _ptr(dq), B * N, D,
                                                float(eps), DTYPE_CODES[p.dtype], _stream(p.device))
        check(lib, code, "alignflow_alignment_backward")
    launches["alignment_backward"] += 1
    return dp, dq


# ------------------------------------------------------------------------------------------------
# Interpolant and velocity loss (csrc/interpolant.cu): tensors viewed as (B, C, S) rows, as in
# kernels/interpolant.py. A shift constant over S goes to the kernel as one fp32 value per row, any other
# as a tensor of x's dtype with row strides (sb, sc) and a unit stride over S.
# ------------------------------------------------------------------------------------------------

PATH_CODES = {"linear": 0, "cosine": 1}


def _rows_view(x):
    batch = x.shape[0]
    channels = x.shape[1] if x.dim() >= 3 else 1
    return batch, channels, x.numel() // max(batch * channels, 1)


def _shift_rows_mode(shift, x) -> bool:
    """True when the shift is constant over S (a per-sample per-channel shift): one value per row."""
    B, C, S = rows_view = _rows_view(x)
    return S > 1 and shift.expand(x.shape).reshape(rows_view).stride(2) == 0


def _flow_shift(shift, x):
    """(full, rows, sb, sc): the shift as the flow kernels take it (see the section's comment)."""
    if shift is None:
        return None, None, 0, 0
    B, C, S = rows_view = _rows_view(x)
    if _shift_rows_mode(shift, x):
        rows = shift.expand(x.shape).reshape(rows_view)[:, :, 0].float().contiguous()  # (B, C): B C values
        return None, rows, 0, 0
    if shift.dtype != x.dtype:
        shift = shift.to(x.dtype)  # exact (supports_flow admits it only into an fp32 x); before the expand
    full = shift.expand(x.shape).reshape(rows_view)
    if S > 1 and full.stride(2) != 1:
        full = full.contiguous()
    return full, None, full.stride(0), full.stride(1)


def supports_flow(op, x, noise, t, source_shift, target_shift, v_pred=None) -> bool:
    """`takes` plus the flow kernels' own limits: noise in x's dtype, a supported (x, v_pred) pair, a
    shift that is not constant over S in x's dtype (or any dtype with an fp32 x: converted exactly)."""
    if not takes(op, (x, noise, v_pred, source_shift, target_shift), contiguous=(x, noise, v_pred)):
        return False
    if t.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        return _fall_back(op, f"t of dtype {t.dtype}")
    if noise.dtype != x.dtype:
        return _fall_back(op, f"noise {noise.dtype} with x {x.dtype} (one dtype for both)")
    lib = library("flow", x.device)
    if v_pred is not None and not lib.alignflow_velocity_supported(DTYPE_CODES[x.dtype], DTYPE_CODES[v_pred.dtype]):
        return _fall_back(op, f"v_pred {v_pred.dtype} with x {x.dtype}")
    for name, shift in (("source_shift", source_shift), ("target_shift", target_shift)):
        if (shift is not None and shift.dtype != x.dtype and x.dtype != torch.float32
                and not _shift_rows_mode(shift, x)):
            return _fall_back(op, f"{name} {shift.dtype} varying over the pixels with x {x.dtype} "
                                  f"(x's dtype, or any with an fp32 x)")
    return True


def supports_interpolant_backward(g_xt, g_v) -> bool:
    grads = [g for g in (g_xt, g_v) if g is not None]
    if not grads or not takes("interpolant", grads):
        return False
    if len({g.dtype for g in grads}) > 1:
        return _fall_back("interpolant", f"output gradients of dtypes {g_xt.dtype} and {g_v.dtype}")
    return True


def flow_chunks(device, rows: int, S: int) -> int:
    """Chunks per row of the flow kernels: the per-chunk sum buffers are (rows, chunks) fp32."""
    return library("flow", device).alignflow_flow_chunks(rows, S)


def _c_shift(args):
    full, rows, sb, sc = args
    return [_ptr(full), _ptr(rows), sb, sc]


def interpolant_forward(x, noise, t, source_shift, target_shift, path):
    """kernels.interpolant._interpolant_forward on the CUDA kernel: (x_t, v) in x's dtype."""
    lib = library("flow", x.device)
    B, C, S = _rows_view(x)
    t = t.float().contiguous()
    mu0, mu1 = _flow_shift(source_shift, x), _flow_shift(target_shift, x)
    x_t = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    v = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if isinstance(lib, Extension):
        lib.module.interpolant_forward(x, noise, t, *mu0, *mu1, x_t, v, B, C, S, PATH_CODES[path])
    else:
        code = lib.alignflow_interpolant_forward(_ptr(x), _ptr(noise), _ptr(t), *_c_shift(mu0), *_c_shift(mu1),
                                                 _ptr(x_t), _ptr(v), B, C, S, PATH_CODES[path], DTYPE_CODES[x.dtype],
                                                 _stream(x.device))
        check(lib, code, "alignflow_interpolant_forward")
    launches["interpolant_forward"] += 1
    return x_t, v


def interpolant_backward(g_xt, g_v, t, rows_view, path, dz1_full, dz0_full, dz1_rows, dz0_rows):
    """kernels.interpolant._interpolant_backward's kernel: writes the fp32 gradients of z1 and z0 given."""
    any_g = g_xt if g_xt is not None else g_v
    lib = library("flow", any_g.device)
    B, C, S = rows_view
    t = t.float().contiguous()
    g_xt = g_xt.contiguous() if g_xt is not None else None
    g_v = g_v.contiguous() if g_v is not None else None
    if isinstance(lib, Extension):
        lib.module.interpolant_backward(g_xt, g_v, t, dz1_full, dz0_full, dz1_rows, dz0_rows, B, C, S,
                                        PATH_CODES[path])
    else:
        code = lib.alignflow_interpolant_backward(_ptr(g_xt), _ptr(g_v), _ptr(t), _ptr(dz1_full), _ptr(dz0_full),
                                                  _ptr(dz1_rows), _ptr(dz0_rows), B, C, S, PATH_CODES[path],
                                                  DTYPE_CODES[any_g.dtype], _stream(any_g.device))
        check(lib, code, "alignflow_interpolant_backward")
    launches["interpolant_backward"] += 1


def velocity_forward(v_pred, x, noise, t, source_shift, target_shift, path):
    """The per-(row, chunk) sums of the squared velocity error, (B C, chunks) fp32."""
    lib = library("flow", x.device)
    B, C, S = _rows_view(x)
    t = t.float().contiguous()
    mu0, mu1 = _flow_shift(source_shift, x), _flow_shift(target_shift, x)
    partial = torch.empty((B * C, lib.alignflow_flow_chunks(B * C, S)), dtype=torch.float32, device=x.device)
    if isinstance(lib, Extension):
        lib.module.velocity_forward(v_pred, x, noise, t, *mu0, *mu1, partial, B, C, S, PATH_CODES[path])
    else:
        code = lib.alignflow_velocity_forward(_ptr(v_pred), _ptr(x), _ptr(noise), _ptr(t), *_c_shift(mu0),
                                              *_c_shift(mu1), _ptr(partial), B, C, S, PATH_CODES[path],
                                              DTYPE_CODES[x.dtype], DTYPE_CODES[v_pred.dtype], _stream(x.device))
        check(lib, code, "alignflow_velocity_forward")
    launches["velocity_forward"] += 1
    return partial


def velocity_backward(v_pred, x, noise, t, source_shift, target_shift, path, scale, d_v_pred, dz1_full, dz0_full,
                      dz1_rows, dz0_rows):
    """kernels.interpolant._velocity_loss_backward's kernel: d_v_pred (v_pred's dtype) and the fp32
    gradients of z1 and z0 given."""
    lib = library("flow", x.device)
    B, C, S = _rows_view(x)
    t = t.float().contiguous()
    scale = scale.float().contiguous()
    mu0, mu1 = _flow_shift(source_shift, x), _flow_shift(target_shift, x)
    if isinstance(lib, Extension):
        lib.module.velocity_backward(v_pred, x, noise, t, *mu0, *mu1, scale, d_v_pred, dz1_full, dz0_full, dz1_rows,
                                     dz0_rows, B, C, S, PATH_CODES[path])
    else:
        code = lib.alignflow_velocity_backward(_ptr(v_pred), _ptr(x), _ptr(noise), _ptr(t), *_c_shift(mu0),
                                               *_c_shift(mu1), _ptr(scale), _ptr(d_v_pred), _ptr(dz1_full),
                                               _ptr(dz0_full), _ptr(dz1_rows), _ptr(dz0_rows), B, C, S,
                                               PATH_CODES[path], DTYPE_CODES[x.dtype], DTYPE_CODES[v_pred.dtype],
                                               _stream(x.device))
        check(lib, code, "alignflow_velocity_backward")
    launches["velocity_backward"] += 1


# ------------------------------------------------------------------------------------------------
# Multi-tensor AdamW step (csrc/adamw.cu): a table of every tensor's pointers and size, and two lists
# of (tensor, chunk) pairs, one for the 128-bit kernel and one for the element kernel.
# ------------------------------------------------------------------------------------------------

def supports_adamw(params, grads, exp_avgs, exp_avg_sqs, grad_scale, params_bf16) -> bool:
    op = "adamw_step"
    tensors = [*params, *grads, *exp_avgs, *exp_avg_sqs, *(params_bf16 or [])]
    if not takes(op, tensors + [grad_scale], contiguous=tensors):
        return False
    if any(t.dtype != torch.float32 for t in (*params, *exp_avgs, *exp_avg_sqs)):
        return _fall_back(op, "params and moments must be float32")
    grad_dtypes = {g.dtype for g in grads}
    if len(grad_dtypes) > 1 or not grad_dtypes <= {torch.float32, torch.bfloat16}:
        return _fall_back(op, f"gradients of dtypes {sorted(map(str, grad_dtypes))} (one of float32, bfloat16)")
    if params_bf16 is not None and any(t.dtype != torch.bfloat16 for t in params_bf16):
        return _fall_back(op, "params_bf16 must be bfloat16")
    if grad_scale is not None and (grad_scale.dtype != torch.float32 or grad_scale.numel() != 1):
        return _fall_back(op, f"grad_scale {grad_scale.dtype} of {grad_scale.numel()} elements (one float32)")
    if len({t.device for t in tensors + ([grad_scale] if grad_scale is not None else [])}) > 1:
        return _fall_back(op, "tensors on several devices")
    return True


def adamw_tables(params, grads, exp_avgs, exp_avg_sqs, params_bf16, chunk: int, vec: int):
    """(table (n, 6) int64, pairs (k, 2) int32, number of vector pairs first): CPU tensors."""
    rows = [[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
             params_bf16[i].data_ptr() if params_bf16 is not None else 0, p.numel()]
            for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs))]
    table = torch.tensor(rows, dtype=torch.int64)
    numel = table[:, 5]
    aligned = (table[:, :5] % 16 == 0).all(1)
    counts = (numel + chunk - 1) // chunk
    tensor = torch.repeat_interleave(torch.arange(len(rows)), counts)
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
    size = torch.clamp(numel[tensor] - index * chunk, max=chunk)
    vector = aligned[tensor] & (size % vec == 0)
    pairs = torch.stack([tensor, index], 1).to(torch.int32)
    return table, torch.cat([pairs[vector], pairs[~vector]]), int(vector.sum())


# the chunk tables of the last few adamw_step calls, on their device, keyed by all that they are built from
_adamw_tables: collections.OrderedDict = collections.OrderedDict()
ADAMW_TABLES_KEPT = 8  # one per (param group, gradient dtype, bf16 copies or not) of a step, with room to spare
adamw_table_builds: collections.Counter = collections.Counter()  # tables built (cache misses), per device type


def device_adamw_tables(params, grads, exp_avgs, exp_avg_sqs, params_bf16, chunk: int, vec: int, device):
    """adamw_tables on `device`, cached by what they are made of: every tensor's address and size, the
    chunk and the vector width. A step over the tensors of an earlier one (the steady state: the caching
    allocator hands each backward's gradients the same blocks) builds and copies nothing; building them
    for SiT-XL/2's 298 tensors took 4.4-5.3 ms on the host (2-core CPU), with a stream sync for the copy
    from pageable memory. A new set is copied from pinned memory without a sync."""
    key = (device, chunk, vec, params_bf16 is not None, tuple(p.numel() for p in params),
           tuple(t.data_ptr() for ts in (params, grads, exp_avgs, exp_avg_sqs, params_bf16 or ()) for t in ts))
    cached = _adamw_tables.get(key)
    if cached is not None:
        _adamw_tables.move_to_end(key)
        return cached
    table, pairs, num_vector = adamw_tables(params, grads, exp_avgs, exp_avg_sqs, params_bf16, chunk, vec)
    if device.type == "cuda":
        table, pairs = (t.pin_memory().to(device, non_blocking=True) for t in (table, pairs))
    adamw_table_builds[device.type] += 1
    _adamw_tables[key] = table, pairs, num_vector
    while len(_adamw_tables) > ADAMW_TABLES_KEPT:
        _adamw_tables.popitem(last=False)
    return table, pairs, num_vector


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay, grad_scale, params_bf16):
    """kernels.adamw.adamw_step on the CUDA kernel (its chunk tables from device_adamw_tables)."""
    device = params[0].device
    lib = library("adamw", device)
    grad_code = DTYPE_CODES[grads[0].dtype]
    table, pairs, num_vector = device_adamw_tables(params, grads, exp_avgs, exp_avg_sqs, params_bf16,
                                                   lib.alignflow_adamw_chunk(), lib.alignflow_adamw_vec(grad_code),
                                                   device)
    beta1, beta2 = betas
    # the step's scalars in double, as torch.optim.AdamW computes them (csrc/adamw.cu's Hyper)
    scalars = [1 - lr * weight_decay, lr / (1 - beta1 ** step), 1 - beta1, beta2, 1 - beta2, eps,
               math.sqrt(1 - beta2 ** step)]
    num_element = pairs.shape[0] - num_vector
    if isinstance(lib, Extension):
        lib.module.adamw_step(table, pairs, num_vector, num_element, *scalars, grad_scale, grad_code)
    else:
        vector_pairs = _ptr(pairs)
        element_pairs = ctypes.c_void_p(pairs.data_ptr() + 8 * num_vector)
        code = lib.alignflow_adamw_step(_ptr(table), vector_pairs, num_vector, element_pairs, num_element, *scalars,
                                        _ptr(grad_scale), grad_code, _stream(device))
        check(lib, code, "alignflow_adamw_step")
    launches["adamw_step"] += 1


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m kernels.cuda_build", description="build csrc/ outside setup.py")
    parser.add_argument("--fatbin", nargs="?", const="", metavar="PATH",
                        help="the torch-independent shared object for sm_80 + sm_90a")
    parser.add_argument("--emulated", action="store_true", help="the emulated shared objects (cached)")
    parser.add_argument("--cubins", action="store_true", help="sm_80 and sm_90a cubins with the ptxas report")
    args = parser.parse_args(argv)
    if not (args.fatbin is not None or args.emulated or args.cubins):
        parser.error("name something to build: --fatbin, --emulated or --cubins")
    if args.fatbin is not None:
        start = time.perf_counter()
        path = build_fatbin(Path(args.fatbin) if args.fatbin else None)
        print(f"{path} ({time.perf_counter() - start:.1f} s)")
    if args.emulated:
        for source in sorted(set(SOURCES.values())):
            start = time.perf_counter()
            print(build_emulated(source), f"({time.perf_counter() - start:.1f} s)")
    if args.cubins:
        for source in sorted(set(SOURCES.values())):
            for arch in ("sm_80", "sm_90a"):
                start = time.perf_counter()
                cubin, report = build_cubin(source, arch)
                print(cubin, f"({time.perf_counter() - start:.1f} s)")
                print("\n".join(line for line in report.splitlines() if "Used" in line or "spill" in line))
    return 0

