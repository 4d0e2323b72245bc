"""Kernel microbenchmarks: every fused op against its reference, side by side in one run.

    python -m bench.kernels [--op NAME] [--budget-s S] [--smoke] [--out DIR]

For each case (op x shape) and variant (reference eager, reference under torch.compile, peers where
installed, ours): median time forward and forward+backward on the device (CUDA events around each
call, the L2 flushed before it and the GPU held by a spin until the host has queued the whole call,
20th/80th percentiles kept to tell noise from a difference) and on the host (what an eager step pays per
call; bench.common.time_call says how each is taken), achieved GB/s (memory-bound ops) or
TFLOP/s (attention), from the device time, the fraction of the device's copy bandwidth or bf16 matmul rate measured in the
same run, the speed-up over the reference (the first variant), and peak memory. Results are written as
JSON keyed by device, torch/Triton versions and date, rewritten after every case and pass so that a run
cut short keeps what it measured. The SiT-XL/2 256 px cases run first; with a time budget (`--budget-s`,
or ALIGNFLOW_DEADLINE from bench/gpu_all.sh) the cases that would start after it are recorded as
skipped. Each case starts from a fresh dynamo cache, so every compiled reference is a static-shape
compile of its own. `--smoke` runs tiny shapes on the CPU (through
the Triton interpreter) so CI keeps the harness working; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import torch

from bench.common import (BenchCase, Deadline, environment, measure_copy_bandwidth, measure_matmul_flops, peak_memory,
                          time_call, write_json, write_results)


def load_cases(device, smoke: bool, only: str | None = None) -> list[BenchCase]:
    import bench.cases

    cases = []
    for info in sorted(pkgutil.iter_modules(bench.cases.__path__), key=lambda m: m.name):
        if only and info.name != only:
            continue
        module = importlib.import_module(f"bench.cases.{info.name}")
        cases.extend(module.cases(device, smoke))
    if only and not cases:
        raise SystemExit(f"no benchmark cases for op {only!r}")
    return sorted(cases, key=lambda case: not case.headline)  # stable: the headline shapes first, by op


# seconds of device-timed calls per variant (the host-timed ones take a quarter of it more): hundreds of
# samples of a memory-bound op, tens of an attention forward+backward; 0.1 s, not 0.5 s, so that the
# SiT-XL/2 256 px cases fit the kernels stage of bench/gpu_all.sh (its budget arithmetic is there)
MIN_TIME_S = 0.1
# the least time left in the stage to start a case's pass: its compiles, warm-ups and timed calls (the
# first H200 run took 222 s for 53 passes at 0.5 s a variant, 4 s a pass on average; this leaves room for
# the longer ones, whose compiles dominate)
PASS_NEEDS_S = 15.0


def run_variant(variant, smoke: bool) -> dict:
    if variant.available is not None:
        return {"variant": variant.name, "skipped": variant.available}
    try:
        fn = variant.make()
        timing = time_call(fn, warmup=1 if smoke else 5, min_time=0.0 if smoke else MIN_TIME_S,
                           max_iters=3 if smoke else 1000)
        memory = peak_memory(fn)
    except Exception as error:  # a peer or compile path that fails is reported, not fatal
        return {"variant": variant.name, "skipped": f"failed: {type(error).__name__}: {str(error)[:200]}"}
    # seconds: the device's time; host_seconds: the host's per call (bench.common.time_call); p20/p80 tell
    # noise from a difference between variants
    return {"variant": variant.name, "seconds": timing.seconds, "seconds_p20": timing.seconds_p20,
            "seconds_p80": timing.seconds_p80, "host_seconds": timing.host_seconds, "peak_memory_bytes": memory}


def _annotate(rows, nbytes, flops, ceilings):
    reference = rows[0] if "seconds" in rows[0] else None  # the first variant is the reference
    for r in rows:
        if "seconds" not in r:
            continue
        if nbytes:
            r["gb_per_s"] = nbytes / r["seconds"] / 1e9
            r["fraction_of_copy_bandwidth"] = nbytes / r["seconds"] / ceilings["copy_bytes_per_s"]
        if flops:
            r["tflop_per_s"] = flops / r["seconds"] / 1e12
            r["fraction_of_matmul_peak"] = flops / r["seconds"] / ceilings["matmul_flop_per_s"]
        if reference is not None:
            r["speedup_vs_reference"] = reference["seconds"] / r["seconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", help="benchmark only this op (a module name in bench/cases)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; checks the harness only")
    parser.add_argument("--out", default="bench/results", help="directory for the JSON results")
    parser.add_argument("--budget-s", type=float, help="stop starting measurements after this many seconds")
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget_s)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no GPU: kernel timings on the CPU interpreter mean nothing; use --smoke", file=sys.stderr)
        return 2
    ceilings = {"copy_bytes_per_s": measure_copy_bandwidth(device),
                "matmul_flop_per_s": measure_matmul_flops(device)}
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"copy {ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s  matmul {ceilings['matmul_flop_per_s'] / 1e12:.1f} TFLOP/s")
    results = []
    payload = {"environment": env, "ceilings": ceilings, "results": results}
    for case in load_cases(device, args.smoke, args.op):
        torch._dynamo.reset()  # a static compile of this case's own (see the module docstring)
        for mode, variants, nbytes, flops in (
                ("forward", case.forward, case.bytes_forward, case.flops_forward),
                ("forward_backward", case.forward_backward, case.bytes_forward_backward, case.flops_forward_backward)):
            if not variants:
                continue
            # a case's pass is started whole or not at all (a ratio needs its reference beside it); the
            # stage's timeout is the backstop
            late = deadline.out_of_time(needed_s=0.0 if args.smoke else PASS_NEEDS_S)
            rows = ([{"variant": v.name, "skipped": late} for v in variants] if late else
                    [run_variant(v, args.smoke) for v in variants])
            _annotate(rows, nbytes, flops, ceilings)
            results.append({"op": case.op, "shape": case.shape, "mode": mode, "notes": case.notes, "variants": rows})
            for r in rows:
                if "seconds" in r:
                    extra = (f"{r['gb_per_s']:8.1f} GB/s {100 * r['fraction_of_copy_bandwidth']:5.1f}% copy" if nbytes else
                             f"{r['tflop_per_s']:8.1f} TFLOP/s {100 * r['fraction_of_matmul_peak']:5.1f}% mm" if flops else "")
                    ratio = r.get("speedup_vs_reference", float("nan"))
                    print(f"{case.op:<18} {case.shape:<28} {mode:<16} {r['variant']:<24} "
                          f"{r['seconds'] * 1e6:10.1f} us  host {r['host_seconds'] * 1e6:8.1f} us  x{ratio:5.2f}  {extra}",
                          flush=True)
                else:
                    print(f"{case.op:<18} {case.shape:<28} {mode:<16} {r['variant']:<24} skipped: {r['skipped']}")
            if not args.smoke:
                write_json("kernels", payload, args.out)  # what is measured so far survives a cut
    from bench.report import kernel_table

    if args.smoke:  # smoke timings are not results; a variant that crashed is a harness failure
        print(kernel_table(payload))
        failed = [f"{r['op']} {r['mode']} {v['variant']}: {v['skipped']}" for r in results for v in r["variants"]
                  if v.get("skipped", "").startswith("failed")]
        print("\n".join(failed) or "smoke run: every available variant ran")
        return 1 if failed else 0
    write_results("kernels", payload, args.out, lambda: kernel_table(payload))
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
