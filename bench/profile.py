"""Where a measured step's time goes on the GPU: one extra step under torch.profiler, summarised.

bench.train_step times each variant's phases with CUDA events; those say how long a phase took, not
whether the GPU was working or waiting for the host to queue its kernels. `profile_step` runs one
more step under torch.profiler (CUDA activity) and `summarize` reduces its device events to:

  busy_s    the union of the intervals in which any kernel, copy or memset ran (the GPU was working)
  idle_s    the step's time (CUDA events around it) less busy_s: the GPU waited, on the host's queuing
            or its synchronisations. An idle fraction near zero: device-bound; large: host-bound
  kernels   the number of device activities (kernels, copies, memsets) in the step
  by_kind   device seconds per kind of kernel (KINDS, by name; overlapping kernels each count in full)

The profiler adds host time of its own to each launch, so the profiled step is slower than the timed
ones: its idle fraction is an upper bound on the timed step's, and busy_s is what the device needs.
"""
from __future__ import annotations

import re

import torch

# Kernel kinds by name, the first that matches (lower case). Our Triton kernels are named after their
# functions (kernels/*.py), the CUDA C++ ones live in namespace alignflow; Inductor's are triton_*.
KINDS = (
    ("ours", re.compile(r"^_(adaln|attn|alignment|interpolant|velocity|gelu|linear_gelu|mlp)|alignflow")),
    ("inductor", re.compile(r"^triton_")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|mha")),
    ("matmul", re.compile(r"gemm|cutlass|cublas|xmma|nvjet|sm90_|sm80_|ampere_|hopper_|cijk")),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach")),
    ("copy", re.compile(r"memcpy|memset|copy|cast")),
)


def kind(name: str) -> str:
    lower = name.lower()
    return next((label for label, pattern in KINDS if pattern.search(lower)), "other")


def busy_seconds(intervals) -> float:
    """Length of the union of (start_ns, end_ns) intervals, in seconds."""
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e9


def summarize(events, step_s: float) -> dict:
    """`events`: (name, start_ns, duration_ns) of the step's device activities."""
    by_kind: dict[str, float] = {}
    for name, _, duration in events:
        label = kind(name)
        by_kind[label] = by_kind.get(label, 0.0) + duration / 1e9
    busy = busy_seconds((start, start + duration) for _, start, duration in events)
    return {"step_s": step_s, "busy_s": busy, "idle_s": max(step_s - busy, 0.0), "kernels": len(events),
            "by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1]))}


def _device_events(prof) -> list[tuple[str, int, int]]:
    cuda = torch.autograd.DeviceType.CUDA
    try:  # Kineto's raw events: fast (a step has thousands)
        return [(e.name(), e.start_ns(), e.duration_ns()) for e in prof.profiler.kineto_results.events()
                if e.device_type() == cuda]
    except AttributeError:  # the parsed events, in microseconds
        return [(e.name, int(e.time_range.start * 1e3), int(e.time_range.elapsed_us() * 1e3)) for e in prof.events()
                if e.device_type == cuda]


def profile_step(step) -> dict | None:
    """Run `step()` once under torch.profiler and summarise its device activity; None off CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
    return summarize(_device_events(prof), start.elapsed_time(end) / 1e3)


def markdown_rows(rows) -> list[str]:
    """The table of the rows' `device_profile` summaries (none: no lines)."""
    profiled = [r for r in rows if r.get("device_profile")]
    if not profiled:
        return []
    kinds = [label for label, _ in KINDS] + ["other"]
    lines = ["One more step of each variant under torch.profiler (slower than the timed steps: the profiler adds "
             "host time to every launch), ms: busy = the GPU running anything, idle = waiting for the host.", "",
             "| variant | profiled step | busy | idle | idle % | kernels | " + " | ".join(kinds) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(kinds)]
    for r in profiled:
        p = r["device_profile"]
        cells = [f"{1e3 * p['by_kind'].get(label, 0.0):.1f}" for label in kinds]
        lines.append(f"| {r['variant']} | {1e3 * p['step_s']:.1f} | {1e3 * p['busy_s']:.1f} | {1e3 * p['idle_s']:.1f} | "
                     f"{100 * p['idle_s'] / p['step_s']:.0f}% | {p['kernels']} | " + " | ".join(cells) + " |")
    return lines
