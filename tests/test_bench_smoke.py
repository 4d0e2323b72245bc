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
