"""The benchmark harness stays runnable: every case of every op runs its variants at tiny sizes."""
import importlib

bench_kernels = importlib.import_module("bench.kernels")


def test_kernel_benchmarks_smoke(capsys):
    assert bench_kernels.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for op in ("interpolant", "velocity_loss", "alignment_loss"):
        assert f"{op} " in out
    assert "smoke run: every available variant ran" in out
