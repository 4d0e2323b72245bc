"""Backend selection for every fused op.

A public op asks `resolve(op, tensors, ...)` which implementation to run. The answer is "triton"
only when the active backend is "triton" or "cuda" and the inputs are supported (under "cuda", an op
of CUDA_OPS then runs its CUDA C++ kernel where kernels/_cuda.py can, its Triton kernel otherwise);
otherwise it is "torch", and the reason is logged once per (op, reason) so that a fallback is never
silent.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterable, Iterator

import torch

log = logging.getLogger("kernels")

BACKENDS = ("torch", "triton", "cuda")
# Ops with a CUDA C++ kernel (csrc/, run through kernels/_cuda.py); the "cuda" backend runs the Triton
# kernel of every other op.
CUDA_OPS = ("adaln_modulate", "adaln_residual_modulate", "alignment_loss", "interpolant", "velocity_loss",
            "adamw_step")


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _default_backend() -> str:
    return "triton" if torch.cuda.is_available() else "torch"


_state = {"backend": None}
_logged: set[tuple[str, str]] = set()


def get_backend() -> str:
    if _state["backend"] is None:
        _state["backend"] = _default_backend()
    return _state["backend"]


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {name!r}")
    _state["backend"] = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend: `with kernels.use_backend("torch"): ...`."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def fallback(op: str, reason: str) -> str:
    """Log (once per op and reason) why `op` runs its reference, and return "torch"."""
    if (op, reason) not in _logged:
        _logged.add((op, reason))
        log.warning("kernels.%s: using the PyTorch reference (%s)", op, reason)
    return "torch"


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve(op: str, tensors: Iterable[torch.Tensor | None], dtypes=TRITON_DTYPES) -> str:
    """Pick "triton" or "torch" for `op` given its tensor inputs (None entries are ignored)."""
    if get_backend() == "torch":
        return "torch"
    if get_backend() == "cuda" and op not in CUDA_OPS and ("cuda", op) not in _logged:
        _logged.add(("cuda", op))
        log.warning("kernels.%s: no CUDA C++ kernel yet; the \"cuda\" backend runs the Triton kernel", op)
    devices = set()  # one pass, each tensor's device read once: this runs at every eager call (host time)
    for x in tensors:
        if x is None:
            continue
        if x.dtype not in dtypes:
            return fallback(op, f"dtype {x.dtype} is not supported by the Triton kernel")
        device = x.device
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            return fallback(op, f"device {device} needs CUDA or TRITON_INTERPRET=1")
        devices.add(device)
    if len(devices) > 1:
        return fallback(op, f"inputs on several devices {sorted(map(str, devices))}")
    return "triton"
