"""The cost model's prediction beside a measured training step (modelled, not measured).

    python -m bench.predict [DIR] [--smoke]        # DIR: bench/results; bench/gpu_all.sh runs it on $OUT

Reads the newest train_step-*.json in DIR, picks the device preset of bench.model whose name the measured
device has (bench.model's `preset_for`), and runs `python -m bench.model` for the same model, batch, resolution,
encoder, REG and CAR-Flow, with the ceilings measured in DIR replacing the datasheet's (bench.model's
`--results`), for the variants that were measured (`--every-variant`: all of bench.model's and the
switch-off ones of bench.train_step), each under
its own name (bench.model models the trainer-* variants at their train.precision):
DIR/model-<preset>-<date>.json. `python -m bench.report` then prints the model's error per variant and
phase. `--smoke` models bench.model's narrow smoke step instead (CI runs the whole chain on the CPU;
its figures mean nothing).
"""
from __future__ import annotations

import argparse
import os
import sys

from bench import model
from bench.common import newest


def newest_step_result(results_dir: str) -> dict | None:
    return newest(results_dir, "train_step")


def model_run(step: dict, results_dir: str, smoke: bool = False, every: bool = False) -> list[str] | None:
    """bench.model's arguments for the measured result `step`: its measured (not skipped) variants that
    bench.model knows (with `every`, all of them: the result may still be growing); None if none."""
    preset = model.preset_for(step["environment"]["device"])
    if preset is None:
        raise SystemExit(f"no bench.model preset for the measured device {step['environment']['device']!r}; "
                         f"presets: {sorted(model.PRESETS)} (add one to bench/model.py PRESETS)")
    measured = {r["variant"] for r in step["variants"] if "seconds_per_step" in r}
    variants = [v for v in model.VARIANTS if every or v in measured]
    variants += [v for v in model.SWITCH_OFF_VARIANTS if every or v in measured]  # modelled only when named
    if not variants:
        return None
    args = ["--device-preset", preset, "--variants", ",".join(variants), "--results", results_dir,
            "--out", results_dir, "--zero-gpus", ""]
    if smoke:
        return args + ["--smoke"]
    args += ["--model", step["model"], "--batch", str(step["batch"]), "--resolution", str(step["resolution"])]
    for key in ("encoder", "encoder_depth"):
        if step.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(step[key])]
    if step.get("reg"):
        args.append("--reg")
    if step.get("car_flow"):
        args += ["--car-flow", step["car_flow"]]
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="bench/results")
    parser.add_argument("--smoke", action="store_true", help="model bench.model's narrow smoke step (CI)")
    parser.add_argument("--every-variant", action="store_true",
                        help="model every variant of bench.train_step, not only those measured so far "
                             "(bench/gpu_all.sh starts it once the result's first variant is written)")
    args = parser.parse_args(argv)
    step = newest_step_result(args.results)
    if step is None:
        print(f"no train_step-*.json in {args.results}: nothing measured to model", file=sys.stderr)
        return 1
    run = model_run(step, args.results, args.smoke, args.every_variant)
    if run is None:
        print(f"{os.path.basename(step['_path'])} has no measured variant that bench.model models: nothing to do")
        return 0
    print("python -m bench.model " + " ".join(a if a else "''" for a in run), flush=True)
    if model.main(run) != 0:
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # bench.model's Triton launches on fake tensors
    sys.exit(main())
