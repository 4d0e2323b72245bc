"""Shared benchmark tools: timing, device ceilings (copy bandwidth, bf16 matmul), result records (written
and read back)."""
from __future__ import annotations

import datetime
import glob
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Variant:
    """One implementation of an op: `make()` returns a zero-argument callable that runs it once.
    `backward=True` variants are timed forward+backward (the callable does both)."""

    name: str
    make: Callable[[], Callable[[], object]]
    available: str | None = None  # None if it can run, else the reason it is skipped


@dataclass
class BenchCase:
    """One op at one shape. `bytes_moved` (per call, forward and forward+backward) gives GB/s;
    `flops` gives TFLOP/s. The first variant is the reference that ratios are taken against."""

    op: str
    shape: str
    forward: list[Variant]
    forward_backward: list[Variant] = field(default_factory=list)
    bytes_forward: float = 0.0
    bytes_forward_backward: float = 0.0
    flops_forward: float = 0.0
    flops_forward_backward: float = 0.0
    notes: str = ""
    headline: bool = False  # the SiT-XL/2 256 px training shape: measured first when time is short


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


_L2_FLUSH: dict = {}


def _flush_l2() -> None:
    """Overwrite a buffer larger than any L2 (H100: 50 MB, H200: 60 MB) so that the next call reads its
    inputs from device memory, as it would in a training step, not from the cache of the last call."""
    if "buffer" not in _L2_FLUSH:
        _L2_FLUSH["buffer"] = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    _L2_FLUSH["buffer"].zero_()


@dataclass
class Timing:
    """What `time_call` measured, in seconds per call: `seconds` (median), `seconds_p20` and
    `seconds_p80` of the device's time on a GPU; `host_seconds` (median) of the host's."""

    seconds: float
    seconds_p20: float
    seconds_p80: float
    host_seconds: float


SPIN_MARGIN_S = 50e-6  # beyond twice the host's time of a call: Python and driver jitter
MAX_SPIN_S = 0.05  # a call whose host time needs more is timed with this spin (the window may then hold idle time)


def spin_seconds(host_seconds: float) -> float:
    """The GPU spin that holds the start event until the host has queued the whole call: twice the
    host's time of the call plus a margin, at most MAX_SPIN_S."""
    return min(2.0 * host_seconds + SPIN_MARGIN_S, MAX_SPIN_S)


class CudaClock:
    """The GPU side of `time_call`: the L2 flush, the spin (torch.cuda._sleep, in clock cycles, its rate
    timed once per process with events, before any sample), events on the current stream."""

    _cycles_per_second: float | None = None

    def __init__(self):
        if CudaClock._cycles_per_second is None:
            cycles = 1 << 21  # about 1 ms at 2 GHz
            for _ in range(2):  # the first also loads the kernel
                start = self.record()
                torch.cuda._sleep(cycles)
                elapsed = self.elapsed(start, self.record())
            CudaClock._cycles_per_second = cycles / elapsed

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def flush_l2(self) -> None:
        _flush_l2()

    def spin(self, seconds: float) -> None:
        torch.cuda._sleep(max(1, math.ceil(seconds * CudaClock._cycles_per_second)))

    def record(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(self, start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _device_clock() -> CudaClock | None:
    return CudaClock() if torch.cuda.is_available() else None


def time_call(fn: Callable[[], object], warmup: int = 3, min_time: float = 0.2, max_iters: int = 1000,
              flush_l2: bool = True) -> Timing:
    """Seconds per call of `fn`, on the device and on the host (a `Timing`).

    On a GPU, two loops after the warm-up:
    - host: `perf_counter` around each call, the GPU idle before it (synchronised), so the figure is
      the host's own time to run the call and queue its kernels (plus any wait of the call's own
      synchronisations): what an eager training step pays per call; the median of calls for about a
      quarter of `min_time`.
    - device: CUDA events around the call with the L2 flushed before it (unless `flush_l2` is off),
      and between the flush and the start event a GPU spin (`torch.cuda._sleep`, `spin_seconds` of the
      host time: twice it plus a margin), so that the start event fires only once the host has queued
      the whole call: the window holds the GPU's work alone, not its wait for a host slower than the
      kernels (without the spin, a call whose host time exceeds the flush's is timed at the host's
      speed). A sample whose queuing outlasted its spin is dropped and the spin regrown from it (at most
      3 times, then kept: a call that synchronises itself waits out any spin). The median and 20th/80th
      percentiles of samples for `min_time` (at least 5, at most `max_iters`).
    On the CPU: perf_counter around each call, the same figure for both."""
    clock = _device_clock()
    for _ in range(warmup):
        fn()
    if clock is None:
        samples = _samples(fn, min_time, max_iters)
        return _timing(samples, samples)
    clock.synchronize()
    host = []
    deadline = time.perf_counter() + min_time / 4
    while len(host) < 5 or (time.perf_counter() < deadline and len(host) < max_iters):
        clock.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
    clock.synchronize()
    spin = spin_seconds(sorted(host)[len(host) // 2])
    samples, regrown = [], 0
    deadline = time.perf_counter() + min_time
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < max_iters):
        if flush_l2:
            clock.flush_l2()
        t0 = time.perf_counter()
        clock.spin(spin)
        start = clock.record()
        fn()
        end = clock.record()
        queued = time.perf_counter() - t0
        seconds = clock.elapsed(start, end)
        if queued > spin and spin < MAX_SPIN_S and regrown < 3:  # the GPU may have waited inside the window
            spin, regrown = spin_seconds(queued), regrown + 1
            continue
        samples.append(seconds)
    return _timing(samples, host)


def _samples(fn, min_time: float, max_iters: int) -> list[float]:
    samples = []
    deadline = time.perf_counter() + min_time
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < max_iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def _timing(device: list[float], host: list[float]) -> Timing:
    device, host = sorted(device), sorted(host)
    return Timing(seconds=device[len(device) // 2], seconds_p20=device[len(device) // 5],
                  seconds_p80=device[(4 * len(device)) // 5], host_seconds=host[len(host) // 2])


def peak_memory(fn: Callable[[], object]) -> int | None:
    if not torch.cuda.is_available():
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), the memory-bound ceiling."""
    n = nbytes // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), flush_l2=False).seconds
    return 2 * n * 4 / seconds


def measure_matmul_flops(device, dtype=torch.bfloat16, n: int = 8192) -> float:
    """Dense matmul rate in FLOP/s at n x n x n, the compute-bound ceiling."""
    if device.type != "cuda":
        n, dtype = 512, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_call(lambda: a @ b, flush_l2=False).seconds
    return 2 * n ** 3 / seconds


def environment() -> dict:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "cpu_cores": os.cpu_count(),
        # the host that queues the kernels: a host-bound step's time depends on it (the first H200 run's
        # eager steps were host-bound)
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(kind: str, payload: dict, directory: str = "bench/results") -> str:
    """bench/results/<kind>-<device>-<date>.json, replaced whole (written aside, then renamed), so a
    benchmark can save what it has measured so far and a run cut short keeps it."""
    os.makedirs(directory, exist_ok=True)
    env = payload["environment"]
    slug = env["device"].split(" (")[0].replace(" ", "-").replace("/", "-")
    path = os.path.join(directory, f"{kind}-{slug}-{env['date']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_results(kind: str, payload: dict, directory: str = "bench/results", table=None) -> str:
    """The JSON (`write_json`), then the markdown `table` (a string, or a function making one, called
    once the JSON is safe) printed. The table's file and the charts are `bench.report`'s, made from the
    JSON: a device call brings back few files, and a result is the JSON alone."""
    path = write_json(kind, payload, directory)
    print(f"wrote {path}")
    if table is not None:
        print(table() if callable(table) else table)
    return path


def _load_all(results_dir: str, kind: str) -> list[dict]:
    """Every `kind-*.json` result, oldest first by its recorded date (file times do not survive a clone)."""
    payloads = []
    for path in glob.glob(os.path.join(results_dir, f"{kind}-*.json")):
        with open(path) as f:
            payload = json.load(f)
        payload["_path"] = path
        payloads.append(payload)
    return sorted(payloads, key=lambda p: (p["environment"]["date"], os.path.getmtime(p["_path"])))


def newest(results_dir: str, kind: str) -> dict | None:
    payloads = _load_all(results_dir, kind)
    return payloads[-1] if payloads else None


def newest_per_device(results_dir: str, kind: str) -> list[dict]:
    """The newest result of `kind` for each device, by device name."""
    per_device = {p["environment"]["device"]: p for p in _load_all(results_dir, kind)}
    return [per_device[device] for device in sorted(per_device)]


def model_payloads(results_dir: str) -> list[dict]:
    """The newest modelled result (`python -m bench.model`: model-<preset>-<date>.json) of each device
    preset, oldest preset name first; the regression guard's model-baseline.json is not one."""
    per_preset = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "model-*.json"))):
        with open(path) as f:
            payload = json.load(f)
        if payload.get("kind") != "model":
            continue
        payload["_path"] = path
        current = per_preset.get(payload["device_preset"])
        if current is None or payload["date"] >= current["date"]:
            per_preset[payload["device_preset"]] = payload
    return [per_preset[k] for k in sorted(per_preset)]


def compiled(fn: Callable, smoke: bool):
    """`torch.compile(fn, dynamic=False)`, or the reason it is skipped (smoke runs skip compilation:
    minutes on CPU). Static shapes, as a training run at a fixed size gets them: without `dynamic=False`
    the second shape of a function would be recompiled with symbolic sizes (dynamo's automatic dynamic
    shapes) and the compiled reference timed at a disadvantage."""
    if smoke:
        return None, "smoke run: torch.compile skipped"
    try:
        return torch.compile(fn, dynamic=False), None
    except Exception as error:  # an unsupported platform is a reported skip, not a failure
        return None, f"torch.compile unavailable: {error}"


class Deadline:
    """The wall-clock end of a benchmark run. A device lease is short (bench/gpu_all.sh gives each call
    a budget), so a benchmark asks `out_of_time()` before each measurement and records the ones it did
    not start as skipped, instead of being cut mid-way and losing them.

    The end is the earlier of now + `budget_s` and ALIGNFLOW_DEADLINE (Unix seconds, set by
    bench/gpu_all.sh for each stage of a device call); neither given: no end."""

    def __init__(self, budget_s: float | None = None):
        ends = [float("inf")]
        if budget_s is not None:
            ends.append(time.time() + budget_s)
        if os.environ.get("ALIGNFLOW_DEADLINE"):
            ends.append(float(os.environ["ALIGNFLOW_DEADLINE"]))
        self.end = min(ends)

    def left(self) -> float:
        return self.end - time.time()

    def out_of_time(self, needed_s: float = 0.0) -> str | None:
        """None while more than `needed_s` seconds are left, else the reason to skip."""
        if self.left() > needed_s:
            return None
        return f"not run: the time budget ran out ({max(self.left(), 0.0):.0f} s left, {needed_s:.0f} s needed)"


def forward_only(fn: Callable[[], object]) -> Callable[[], Callable[[], object]]:
    """A Variant factory timing `fn` under torch.no_grad (the forward pass alone)."""

    def run():
        with torch.no_grad():
            return fn()

    return lambda: run


def backward_of(forward: Callable[[], object], leaves: list[torch.Tensor]) -> Callable[[], object]:
    """forward + backward of a scalar (or summed) output, clearing the leaves' grads each call."""

    def run():
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.backward([o for o in outs], [torch.ones_like(o) for o in outs])

    return run
