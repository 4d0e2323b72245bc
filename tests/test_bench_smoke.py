"""The benchmark harness stays runnable: every case of every op runs its variants at tiny sizes."""
import importlib

bench_kernels = importlib.import_module("bench.kernels")
bench_train_step = importlib.import_module("bench.train_step")


def test_kernel_benchmarks_smoke(capsys):
    assert bench_kernels.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for op in ("interpolant", "velocity_loss", "alignment_loss"):
        assert f"{op} " in out
    assert "smoke run: every available variant ran" in out


def test_train_step_benchmark_smoke(capsys):
    """Reference and fused variants both train a tiny SiT + REPA step; the loaders run too."""
    assert bench_train_step.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| reference-eager |" in out and "| alignflow |" in out
    assert "| pil |" in out


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
    sections = ("kernel-results", "train-step-results", "data-results")
    readme.write_text("".join(f"<!-- BEGIN {s} -->\nstale\n<!-- END {s} -->\n" for s in sections))
    assert bench_report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.count("Not measured yet") == 2
    assert "| pil | 755 |" in text and "data-cpu-2026-11-24.json" in text


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
