"""The benchmark harness stays runnable: every case of every op runs its variants at tiny sizes."""
import importlib
import time

import pytest
import torch

bench_kernels = importlib.import_module("bench.kernels")
bench_train_step = importlib.import_module("bench.train_step")


def test_kernel_benchmarks_smoke(capsys):
    assert bench_kernels.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for op in ("interpolant", "velocity_loss", "alignment_loss"):
        assert f"{op} " in out
    assert "smoke run: every available variant ran" in out


def test_train_step_benchmark_smoke(capsys):
    """Reference and fused variants both train a tiny SiT + REPA step, and so does the trainer's own step
    (DeepSpeed ZeRO-2 on one gloo rank, bf16 and bf16-mixed; a skipped variant fails the smoke run); the
    loaders run too. The trainer leaves no process group or environment behind."""
    import os

    import torch.distributed as dist

    launch_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
    environ, had_group = {k: os.environ.get(k) for k in launch_keys}, dist.is_initialized()
    assert bench_train_step.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| reference-eager |" in out and "| alignflow |" in out
    assert "| trainer-bf16 |" in out and "| trainer-bf16-mixed |" in out and "trainer-* rows time" in out
    # trainer-bf16-mixed-zero0's train.zero_stage reached DeepSpeed (the one row at stage 0)
    assert "| trainer-bf16-mixed-zero0 |" in out and out.count("'zero_stage': 0") == 1
    assert dist.is_initialized() == had_group and {k: os.environ.get(k) for k in launch_keys} == environ
    assert "images from the pil loader" in out and "| data | encoder |" in out  # the trainer's own loader
    assert "| pil |" in out


def test_trainer_host_benchmark_smoke(capsys, tmp_path):
    """bench.trainer_host times the plain eager step and the trainer's step at ZeRO 0/1/2 in bf16 and bf16-mixed
    on the CPU (host time: no number is asserted), each row under the stage and optimizer it names, and reports
    the one configuration the trainer does not run (bf16 weights without ZeRO) with DeepSpeed's reason. It leaves
    no process group or launch environment behind."""
    import os
    import re

    import torch.distributed as dist

    bench_trainer_host = importlib.import_module("bench.trainer_host")
    launch_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
    environ, had_group = {k: os.environ.get(k) for k in launch_keys}, dist.is_initialized()
    assert bench_trainer_host.main(["--smoke", "--out", str(tmp_path)]) == 1  # a row did not run: bf16 ZeRO-0
    out = capsys.readouterr().out
    assert dist.is_initialized() == had_group and {k: os.environ.get(k) for k in launch_keys} == environ
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ") and " | " in line}
    zero = "DeepSpeedZeroOptimizer"
    optimizers = {"eager": "none", "trainer-bf16-zero1": zero, "trainer-bf16-zero2": zero,
                  "trainer-bf16-mixed-zero0": "ClippedAdamW", "trainer-bf16-mixed-zero1": zero,
                  "trainer-bf16-mixed-zero2": zero}
    for name, optimizer in optimizers.items():
        assert re.fullmatch(rf"\| {name}( \| \d+\.\d){{5}} \| {optimizer} \|", rows[name]), rows[name]
    assert "skipped: TypeError: DeepSpeed optimizer FP16_UnfusedOptimizer" in rows["trainer-bf16-zero0"]
    assert set(rows) == {*optimizers, "trainer-bf16-zero0", "row"} and "Not a GPU measurement" in out
    assert not list(tmp_path.iterdir())  # a smoke run writes no result


def test_timed_steps_splits_each_step_into_its_phases():
    """Each phase is the time from the previous mark to its own (a phase marked twice in a step is
    summed), so the phases of a step add up to the step; medians are taken over the timed steps."""
    import argparse

    import torch

    def step(mark):
        for phase in ("data", "encoder", "forward", "backward", "data", "encoder", "forward", "backward", "optimizer"):
            time.sleep(0.001)
            mark(phase)
        return "last"

    args = argparse.Namespace(warmup=1, steps=1, batch=8)
    row, out = bench_train_step.timed_steps(step, args, torch.device("cpu"))
    phases = row["breakdown_seconds"]
    assert out == "last" and set(phases) == set(bench_train_step.PHASES) | {"step"}
    assert sum(phases[p] for p in bench_train_step.PHASES) == pytest.approx(row["seconds_per_step"], rel=1e-9)
    assert phases["data"] > phases["optimizer"] >= 0.001 and row["img_per_s"] == 8 / row["seconds_per_step"]


def test_train_step_runs_the_most_informative_variants_first():
    """A time budget skips the tail of ORDER: the compiled pair and CUDA graphs come right after the eager
    pair, the trainer's rows after them, the variants one switch away from alignflow (or, last, from
    alignflow-graphs-all: another compile) after those; each once."""
    order = bench_train_step.ORDER
    assert sorted(order) == sorted([*bench_train_step.VARIANTS, *bench_train_step.TRAINER_VARIANTS])
    assert order[:6] == ["reference-eager", "alignflow", "reference-compiled", "alignflow-compiled", "alignflow-graphs",
                         "alignflow-graphs-all"]
    tail = ["alignflow-separate-clip", "alignflow-bf16-copies", "alignflow-adamw-kernel",
            *bench_train_step.SWITCH_OFF_VARIANTS, "alignflow-graphs-all-fp32-grads"]
    assert all(name.startswith("trainer-") for name in order[6:-len(tail)])
    assert order[-len(tail):] == tail


def test_every_trainer_variant_is_a_valid_config_on_a_gpu(tmp_path):
    """Each trainer-* row's ExperimentConfig (bench.train_step.trainer_config: its precision, ZeRO stage,
    compile, CUDA graphs and AdamW kernel) passes engine.config.validate for one GPU, so a GPU call is
    not spent on a config error; the switches are the ones the name says."""
    import argparse

    from engine.config import validate

    parser = argparse.ArgumentParser()
    bench_train_step.add_step_arguments(parser)
    args = parser.parse_args(["--model", "SiT-S/2", "--batch", "2", "--resolution", "32", "--encoder-depth", "1"])
    args.smoke, args.steps, args.warmup, args.loader, args.trainer_fused_clip = True, 2, 1, "pil", "auto"
    parts = bench_train_step.build(args, torch.device("cpu"))
    for name, (precision, use_compile) in bench_train_step.TRAINER_VARIANTS.items():
        cfg = bench_train_step.trainer_config(
            args, parts, precision, use_compile, str(tmp_path / name), str(tmp_path / "latents"),
            bench_train_step.TRAINER_ZERO_STAGES.get(name),
            "alignflow" if name in bench_train_step.ADAMW_KERNEL_VARIANTS else "torch")
        validate(cfg, world_size=1, cuda_available=True, disk=False)
        assert cfg.train.cuda_graphs == name.endswith(("-graphs", "-graphs-all")), name
        assert (cfg.optim.step_kernel == "alignflow") == name.endswith("-all"), name
        assert cfg.train.zero_stage == bench_train_step.TRAINER_ZERO_STAGES.get(name), name


def test_train_step_adamw_kernel_variant_runs_the_kernel_or_is_skipped(monkeypatch, capsys):
    """alignflow-adamw-kernel steps with csrc/adamw.cu (here in the emulator) and reports its row; where the
    kernel cannot run (no emulator asked for) the row is skipped naming why, never timed on a fallback."""
    from kernels import _cuda

    monkeypatch.delenv("ALIGNFLOW_CUEMU", raising=False)
    assert bench_train_step.main(["--smoke", "--skip-data", "--variants", "alignflow-adamw-kernel"]) == 1
    assert "skipped: RuntimeError: the CUDA AdamW kernel is not available: CPU tensors" in capsys.readouterr().out
    if _cuda.emulator_missing():
        pytest.skip(_cuda.emulator_missing())
    monkeypatch.setenv("ALIGNFLOW_CUEMU", "1")
    launched = _cuda.launches["adamw_step"]
    assert bench_train_step.main(["--smoke", "--skip-data", "--variants", "alignflow-adamw-kernel"]) == 0
    assert "| alignflow-adamw-kernel | " in capsys.readouterr().out
    assert _cuda.launches["adamw_step"] >= launched + 3  # warm-up and timed steps, one call per step


def test_data_benchmark_smoke(capsys):
    """The PIL and DALI CPU loaders both decode the same JPEG files (a skipped one fails the smoke run)."""
    bench_data = importlib.import_module("bench.data")
    assert bench_data.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| pil | " in out and "| dali-cpu | " in out and "skipped" not in out


def test_report_regenerates_the_readme_sections(tmp_path):
    """bench.report fills each README section from the newest result of its kind (here the data-loading
    result measured and committed in bench/results) and says "not measured yet" where none exists."""
    import shutil

    bench_report = importlib.import_module("bench.report")
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy("bench/results/data-cpu-2026-11-24.json", results)
    readme = tmp_path / "README.md"
    sections = ("kernel-results", "train-step-results", "data-results", "model-results", "model-zero-results")
    readme.write_text("".join(f"<!-- BEGIN {s} -->\nstale\n<!-- END {s} -->\n" for s in sections))
    assert bench_report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.count("Not measured yet") == 2
    assert "| pil | 755 |" in text and "data-cpu-2026-11-24.json" in text
    assert "| pil | 755 |" in (results / "data-cpu-2026-11-24.md").read_text()  # the table beside its result


def test_train_step_table_without_a_reference_row():
    """A skipped reference (out of memory, or left out of --variants) leaves "-" ratios, not a crash
    that would lose the run's results."""
    row = {"variant": "alignflow", "seconds_per_step": 0.04, "img_per_s": 800.0, "peak_memory_bytes": 2 ** 34,
           "breakdown_seconds": dict.fromkeys(("encoder", "forward", "backward", "optimizer"), 0.01),
           "tflop_per_s": 300.0, "mfu": 0.4}
    payload = {"environment": {"device": "gpu", "torch": "t", "triton": "t", "date": "d"}, "model": "SiT-XL/2",
               "batch": 32, "resolution": 256, "matmul_flop_per_s": 7e14, "data": [],
               "variants": [{"variant": "reference-eager", "skipped": "out of memory"}, row]}
    table = bench_train_step.markdown(payload)
    assert "| reference-eager | skipped: out of memory |" in table and "| alignflow | 800.0 | - | 40.0 |" in table


def test_a_spent_budget_skips_every_measurement_and_says_so(capsys, monkeypatch):
    """bench/gpu_all.sh gives each stage a deadline: what would start after it is recorded as not run
    (and left out of the table, with a line naming it) rather than cut half-way."""
    common = importlib.import_module("bench.common")
    monkeypatch.setenv("ALIGNFLOW_DEADLINE", "0")  # long past
    assert common.Deadline().out_of_time().startswith("not run: the time budget ran out")
    assert bench_kernels.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "Not run in this call (its time budget ran out): " in out and "interpolant 2x4x8x8" in out
    assert "| interpolant |" not in out  # no row of a case that did not run
    assert bench_train_step.main(["--smoke", "--skip-data"]) == 1  # a smoke run that measured nothing fails
    out = capsys.readouterr().out
    assert "| reference-eager | skipped: not run: the time budget ran out" in out


def test_deadline_takes_the_earlier_end(monkeypatch):
    common = importlib.import_module("bench.common")
    monkeypatch.delenv("ALIGNFLOW_DEADLINE", raising=False)
    assert common.Deadline().left() == float("inf") and common.Deadline().out_of_time(1e9) is None
    assert 99 < common.Deadline(budget_s=100).left() <= 100
    monkeypatch.setenv("ALIGNFLOW_DEADLINE", str(time.time() + 50))
    assert 49 < common.Deadline(budget_s=100).left() <= 50
    assert common.Deadline(budget_s=100).out_of_time(needed_s=60).endswith("60 s needed)")


def test_ratios_only_against_the_reference_measured_beside_them():
    """A kernel case whose reference variant did not run gets no speed-up figures (the table shows '-'),
    instead of ratios against whichever variant ran first."""
    rows = [{"variant": "reference eager", "skipped": "failed: out of memory"},
            {"variant": "triton", "seconds": 1e-4, "host_seconds": 3e-5},
            {"variant": "reference compiled", "seconds": 2e-4, "host_seconds": 5e-5}]
    bench_kernels._annotate(rows, 1e9, 0, {"copy_bytes_per_s": 4e12, "matmul_flop_per_s": 8e14})
    assert all("speedup_vs_reference" not in r for r in rows) and rows[1]["gb_per_s"] == 1e4
    payload = {"environment": {"device": "gpu", "torch": "t", "triton": "t", "date": "d"},
               "ceilings": {"copy_bytes_per_s": 4e12, "matmul_flop_per_s": 8e14},
               "results": [{"op": "adaln_modulate", "shape": "s", "mode": "forward", "variants": rows}]}
    table = importlib.import_module("bench.report").kernel_table(payload)
    assert "| adaln_modulate | s | forward | triton | 100.0 | 30.0 | - | 10000 GB/s | 250% |" in table


class _FakeStream:
    """A GPU stream on the host's clock, for `bench.common.time_call`'s device path on the CPU: work queued
    at host time h starts at max(h, when the stream is free); an event fires when the stream reaches it;
    a synchronisation sleeps until the stream is idle. `spin=False` makes the spin do nothing."""

    def __init__(self, spin=True):
        self.free_at, self.spin_works, self.spins = 0.0, spin, []

    def queue(self, seconds):
        self.free_at = max(time.perf_counter(), self.free_at) + seconds

    def synchronize(self):
        time.sleep(max(0.0, self.free_at - time.perf_counter()))

    def flush_l2(self):
        self.queue(1e-4)

    def spin(self, seconds):
        self.spins.append(seconds)
        self.queue(seconds if self.spin_works else 0.0)

    def record(self):
        self.free_at = max(time.perf_counter(), self.free_at)
        return self.free_at

    def elapsed(self, start, end):
        self.synchronize()
        return end - start


def _host_bound_call(stream, host_s, device_s, slower_once_spun=1.0):
    """A call whose host takes `host_s` to queue one kernel of `device_s` (x `slower_once_spun` for the
    host after the first spin, i.e. in time_call's device loop)."""

    def call():
        time.sleep(host_s * (slower_once_spun if stream.spins else 1.0))
        stream.queue(device_s)

    return call


@pytest.mark.parametrize("slower_once_spun", [1.0, 4.0])
def test_time_call_holds_the_gpu_until_the_call_is_queued(monkeypatch, slower_once_spun):
    """A call that the host queues in 1-2 ms and the GPU runs in 0.2 ms (adaln_modulate's case on the
    H200: events around the call alone timed the host): the device time is the kernel's and the host time
    the host's. With a host that turns slower than the spin was sized for, the late samples are dropped
    and the spin regrown. The fake stream reproduces the fault: with a spin that does nothing, the window
    holds the host's time."""
    common = importlib.import_module("bench.common")
    host_s, device_s = 0.002 if slower_once_spun == 1.0 else 0.001, 2e-4
    stream = _FakeStream(spin=False)
    monkeypatch.setattr(common, "_device_clock", lambda: stream)
    assert common.time_call(_host_bound_call(stream, host_s, device_s), warmup=1, min_time=0.04).seconds > host_s

    stream = _FakeStream()
    timing = common.time_call(_host_bound_call(stream, host_s, device_s, slower_once_spun), warmup=1, min_time=0.04)
    assert timing.seconds == pytest.approx(device_s, abs=1e-9) and timing.seconds_p20 == pytest.approx(device_s, abs=1e-9)
    assert host_s <= timing.host_seconds < 3 * host_s  # the host loop's figure (before the call turned slower)
    assert stream.spins[0] == pytest.approx(common.spin_seconds(timing.host_seconds))
    if slower_once_spun > 1.0:
        assert max(stream.spins) >= common.spin_seconds(slower_once_spun * host_s)


def test_spin_sizing_and_the_cpu_path():
    common = importlib.import_module("bench.common")
    assert common.spin_seconds(1e-4) == pytest.approx(2e-4 + common.SPIN_MARGIN_S)
    assert common.spin_seconds(10.0) == common.MAX_SPIN_S
    if not torch.cuda.is_available():  # on the CPU both figures are perf_counter's, of the same calls
        timing = common.time_call(lambda: time.sleep(0.002), warmup=0, min_time=0.0)
        assert 0.002 <= timing.seconds == timing.host_seconds and timing.seconds_p20 <= timing.seconds <= timing.seconds_p80


def test_results_are_replaced_whole(tmp_path):
    """A benchmark rewrites its JSON as it measures; each write replaces the file whole."""
    import json

    common = importlib.import_module("bench.common")
    payload = {"environment": {"device": "NVIDIA H200 (x)", "date": "2026-12-02"}, "rows": [1]}
    path = common.write_json("kernels", payload, str(tmp_path))
    payload["rows"].append(2)
    assert common.write_json("kernels", payload, str(tmp_path)) == path
    assert path.endswith("kernels-NVIDIA-H200-2026-12-02.json") and json.load(open(path))["rows"] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels-NVIDIA-H200-2026-12-02.json"]


def test_report_fills_the_gpu_tables_and_draws_the_charts(tmp_path):
    """From kernel and training-step results shaped as the benchmarks write them (made-up numbers: this
    checks the report, not a device), bench.report fills both GPU tables and draws a PNG beside each."""
    import json

    bench_report = importlib.import_module("bench.report")
    env = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "date": "2026-12-02"}
    rows = [{"variant": "eager (SiT)", "seconds": 4e-5, "host_seconds": 8e-5},
            {"variant": "eager compiled", "seconds": 2e-5, "host_seconds": 2e-5},
            {"variant": "triton", "seconds": 1e-5, "host_seconds": 6e-5}]
    bench_kernels._annotate(rows, 4e7, 0, {"copy_bytes_per_s": 4e12, "matmul_flop_per_s": 8e14})
    kernels_payload = {"environment": env, "ceilings": {"copy_bytes_per_s": 4e12, "matmul_flop_per_s": 8e14},
                       "results": [{"op": "adaln_modulate", "shape": "32x256x1152 bf16 SiT-XL/2 256px",
                                    "mode": "forward", "variants": rows}]}
    step = {"variant": "alignflow", "seconds_per_step": 0.05, "img_per_s": 640.0, "peak_memory_bytes": 2 ** 34,
            "breakdown_seconds": dict.fromkeys(("data", "encoder", "forward", "backward", "optimizer"), 0.01),
            "tflop_per_s": 400.0, "mfu": 0.5, "host_syncs_per_step": 1}
    step_payload = {"environment": env, "model": "SiT-XL/2", "batch": 32, "resolution": 256, "matmul_flop_per_s": 8e14,
                    "loader": "pil", "data": [], "variants": [step]}
    results = tmp_path / "results"
    results.mkdir()
    (results / "kernels-NVIDIA-H200-2026-12-02.json").write_text(json.dumps(kernels_payload))
    (results / "train_step-NVIDIA-H200-2026-12-02.json").write_text(json.dumps(step_payload))
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"<!-- BEGIN {s} -->\n<!-- END {s} -->\n"
                              for s in ("kernel-results", "train-step-results", "data-results", "model-results",
                                        "model-zero-results")))
    assert bench_report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert ("| adaln_modulate | 32x256x1152 bf16 SiT-XL/2 256px | forward | triton | 10.0 | 60.0 | 4.00x | 4000 GB/s "
            "| 100% |") in text  # the ratio is of device time
    assert "| alignflow | 640.0 | - | 50.0 | 10.0 |" in text and "images from the pil loader" in text
    for name in ("kernels-NVIDIA-H200-2026-12-02", "train_step-NVIDIA-H200-2026-12-02"):
        assert (results / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (results / f"{name}.md").read_text() in text  # the README's table, beside its result


def _measured_step_payload(env, rows):
    return {"environment": env, "model": "SiT-XL/2", "batch": 32, "resolution": 256, "encoder": "dinov2-vit-b",
            "encoder_depth": 8, "reg": False, "car_flow": "none", "matmul_flop_per_s": 8e14, "loader": "dali",
            "data": [], "variants": rows}


def _measured_row(variant, step, **phases):
    breakdown = dict(phases, step=step)
    return {"variant": variant, "seconds_per_step": step, "img_per_s": 32 / step, "peak_memory_bytes": 2 ** 34,
            "breakdown_seconds": breakdown, "tflop_per_s": 400.0, "mfu": 0.5, "host_syncs_per_step": 1}


def _modelled_payload(variants):
    """Shaped as bench.model writes it (made-up numbers)."""
    import bench.model as model

    out = {}
    for name, phases in variants.items():
        step = sum(phases.values())
        categories = dict.fromkeys(model.CATEGORIES, 0.0)
        categories.update(matmul=step - phases["encoder"] - phases["optimizer"], encoder=phases["encoder"],
                          optimizer=phases["optimizer"])
        out[name] = {"step_s": step, "img_per_s": 32 / step, "categories": categories, "phases": phases}
    return {"kind": "model", "date": "2026-12-02", "device_preset": "h100-sxm",
            "environment": {"device": "modelled H100 SXM", "date": "2026-12-02"},
            "device": {"device": "H100 SXM", "bandwidth_from": "datasheet 3.35 TB/s x 0.9",
                       "bf16_from": "measured bf16 matmul rate, train_step-NVIDIA-H100-80GB-HBM3-2026-12-02.json"},
            "config": {"model": "SiT-XL/2", "batch": 32, "resolution": 256, "precision": "bf16-mixed"},
            "variants": out, "assumptions": ["modelled, not measured"]}


def test_report_gives_the_models_error_per_variant_and_phase(tmp_path):
    """From a measured train_step result and a bench.model result beside it (shaped as both write them;
    made-up numbers), bench.report's table gives the signed error of the step less its data wait and of
    each phase, marks those beyond 20% and names them; a variant the model lacks is said to be. (The
    end-to-end test below has bench.report print it and put it under the measured table.)"""
    import json

    from bench.common import newest
    from bench.model import prediction_for

    bench_report = importlib.import_module("bench.report")
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "date": "2026-12-02"}
    rows = [{"variant": "reference-eager", "skipped": "out of memory"},
            _measured_row("alignflow", 0.052, data=0.002, encoder=0.005, forward=0.015, backward=0.020, optimizer=0.010),
            _measured_row("trainer-bf16", 0.050, data=0.0, encoder=0.005, forward=0.015, backward=0.020, optimizer=0.010),
            _measured_row("trainer-bf16-compiled", 0.040, data=0.0, encoder=0.005, forward=0.010, backward=0.015,
                          optimizer=0.010)]
    results = tmp_path / "results"
    results.mkdir()
    (results / "train_step-NVIDIA-H100-80GB-HBM3-2026-12-02.json").write_text(json.dumps(_measured_step_payload(env, rows)))
    modelled = {  # alignflow: step 0.055 vs 0.050 (+10%), fwd+loss 0.012 + 0.003 = 0.015 (+0%), backward +40%
        "alignflow": dict(encoder=0.0055, forward=0.012, loss=0.003, backward=0.028, optimizer=0.0065),
        # trainer-bf16: step 0.035 vs 0.050 (-30%), optimizer 0.012 (+20%: not beyond), the rest -50%..0%
        "trainer-bf16": dict(encoder=0.005, forward=0.006, loss=0.002, backward=0.010, optimizer=0.012)}
    (results / "model-h100-sxm-2026-12-02.json").write_text(json.dumps(_modelled_payload(modelled)))
    (results / "model-h200-2026-12-02.json").write_text(json.dumps(dict(_modelled_payload({}), device_preset="h200")))
    step = newest(str(results), "train_step")
    prediction = prediction_for(str(results), step)
    assert prediction["device_preset"] == "h100-sxm"  # the measured device's, not another preset's
    printed = bench_report.model_error_table(step, prediction)
    assert "| alignflow | 50.0 | 55.0 | +10% | +10% | +10% | +0% | +40% ! | -35% ! |" in printed  # one lane: the same
    assert "| trainer-bf16 | 50.0 | 35.0 | -30% ! | -30% ! | +0% | -47% ! | -50% ! | +20% |" in printed
    assert "| trainer-bf16-compiled | not modelled |" in printed and "| reference-eager |" not in printed
    assert ("Off by more than 20%: alignflow (backward +40%, optimizer -35%); trainer-bf16 (step -30%, fwd+loss -47%, "
            "backward -50%). The model's assumptions need correcting") in printed
    assert "(model-h100-sxm-2026-12-02.json, H100 SXM; bandwidth datasheet 3.35 TB/s x 0.9" in printed
    assert "another step than was measured" not in printed
    assert bench_report.model_error_table(step, None).startswith("\nNo modelled prediction beside this result")


def test_predict_models_each_measured_variant(tmp_path):
    """bench.predict names the preset from the measured device and runs bench.model for the measured
    variants only (a skipped one is not modelled; --every-variant: all), with this run's ceilings."""
    import bench.model as model

    predict = importlib.import_module("bench.predict")
    assert model.preset_for("NVIDIA H100 80GB HBM3") == "h100-sxm" and model.preset_for("NVIDIA H200") == "h200"
    assert model.preset_for("NVIDIA A100-SXM4-80GB") == "a100-80gb" and model.preset_for("Tesla T4") is None
    env = {"device": "NVIDIA H200", "date": "2026-12-02"}
    rows = [_measured_row(v, 0.05) for v in ("trainer-bf16", "alignflow", "alignflow-no-fused-gelu")]
    rows.append({"variant": "reference-eager", "skipped": "not run: the time budget ran out"})
    run = predict.model_run(_measured_step_payload(env, rows), str(tmp_path))
    assert run == ["--device-preset", "h200", "--variants", "alignflow,trainer-bf16,alignflow-no-fused-gelu",
                   "--results", str(tmp_path),
                   "--out", str(tmp_path), "--zero-gpus", "", "--model", "SiT-XL/2", "--batch", "32",
                   "--resolution", "256", "--encoder", "dinov2-vit-b", "--encoder-depth", "8", "--car-flow", "none"]
    every = predict.model_run(_measured_step_payload(env, rows), str(tmp_path), every=True)
    assert every[every.index("--variants") + 1] == ",".join([*model.VARIANTS, *model.SWITCH_OFF_VARIANTS])
    assert predict.model_run(_measured_step_payload(env, rows[3:]), str(tmp_path)) is None
    with pytest.raises(SystemExit, match="no bench.model preset for the measured device 'Tesla T4'"):
        predict.model_run(_measured_step_payload({"device": "Tesla T4", "date": "d"}, rows), str(tmp_path))


def test_predict_then_report_end_to_end_on_the_cpu(tmp_path, capsys):
    """The chain bench/gpu_all.sh runs beside its train stage, on bench.model's smoke step: bench.predict
    writes the prediction beside a measured (made-up) H100 result, bench.report prints the error and puts
    it under the measured table."""
    import json

    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "t", "triton": "t", "date": "2026-12-02"}
    rows = [_measured_row("alignflow", 0.05, data=0.0, encoder=0.005, forward=0.015, backward=0.02, optimizer=0.01),
            _measured_row("trainer-bf16", 0.05, data=0.0, encoder=0.005, forward=0.015, backward=0.02, optimizer=0.01)]
    results = tmp_path / "results"
    results.mkdir()
    (results / "train_step-NVIDIA-H100-80GB-HBM3-2026-12-02.json").write_text(json.dumps(_measured_step_payload(env, rows)))
    assert importlib.import_module("bench.predict").main([str(results), "--smoke"]) == 0
    (path,) = results.glob("model-h100-sxm-*.json")
    assert list(json.loads(path.read_text())["variants"]) == ["alignflow", "trainer-bf16"]
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"<!-- BEGIN {s} -->\n<!-- END {s} -->\n" for s in
                              ("kernel-results", "train-step-results", "data-results", "model-results",
                               "model-zero-results")))
    capsys.readouterr()
    assert importlib.import_module("bench.report").main(["--results", str(results), "--readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    assert "| alignflow | 50.0 |" in printed and "| trainer-bf16 | 50.0 |" in printed
    assert "another step than was measured" in printed  # the smoke step is not SiT-XL/2 at batch 32
    table = printed.split("Model error")[1].split("\n\n", 2)[1]  # the table's rows, beside the measured table
    assert table in readme.read_text() and "| trainer-bf16 | 50.0 |" in table


def test_csrc_sanitize_program_runs_every_launcher(monkeypatch):
    """bench/csrc_sanitize.py, what gpu_all.sh's sanitize stage runs under compute-sanitizer, on the CPU
    in the CUDA emulator: every launcher runs and matches its reference."""
    from kernels import _cuda

    if _cuda.emulator_missing():
        pytest.skip(_cuda.emulator_missing())
    monkeypatch.setenv("ALIGNFLOW_CUEMU", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import bench.csrc_sanitize

    ran = bench.csrc_sanitize.run(torch.device("cpu"))
    assert ran["velocity_backward"] == 6 and ran["adaln_backward"] == 6, ran
