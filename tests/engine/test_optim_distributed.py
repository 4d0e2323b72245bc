"""optim.fused_clip under DeepSpeed on two CPU ranks (gloo): for ZeRO 0 (the optimizer's own norm of
the averaged gradients), 1, 2 and 3 (DeepSpeed's norm of the partitioned gradients), the same fixed-seed run with DeepSpeed
clipping (fused_clip false) and with the clip inside the fused AdamW step gives the same losses, the
same logged gradient norms and the same fp32 master weights within float rounding, with clipping
active in every step (grad_clip below the norms)."""
import json

import numpy as np
import pytest

from tests.engine.trainer_fixtures import launch, tiny_config, write_config, write_zero3_json

RUNS = "0:fp32,1:bf16-mixed,2:fp32,3:bf16"
CLIP = 0.05


def test_fused_clip_matches_deepspeeds_clipping(tmp_path):
    raw = tiny_config(tmp_path / "run", tmp_path / "data", optim={"lr": 1e-3, "warmup_steps": 0, "grad_clip": CLIP},
                      train={"debug_fixed_batch": True})
    out = tmp_path / "result.json"
    proc = launch(["--config", write_config(raw, tmp_path / "config.yaml"), "--zero3-json",
            write_zero3_json(tmp_path / "zero3.json"), "--runs", RUNS, "--steps", "3", "--out", str(out)],
           module="tests.engine.optim_worker")
    print("\n".join(line for line in proc.stdout.splitlines() if "fused_clip=" in line))
    results = json.loads(out.read_text())
    assert list(results) == RUNS.split(",")
    for run, r in results.items():
        stage, precision = run.split(":")
        assert r["fused_clip"] == [False, True] and r["zero_stage"] == int(stage) and r["precision"] == precision
        separate, fused = (np.array(x) for x in r["grad_norms"])
        assert (fused > 2 * CLIP).all(), (run, fused)  # every step clipped
        if stage == "0":  # DeepSpeed's stage-0 engine clips without keeping the norm: NaN in the log
            assert np.isnan(separate).all(), (run, separate)
        else:
            np.testing.assert_allclose(fused, separate, rtol=1e-4, err_msg=run)
        np.testing.assert_allclose(r["losses"][1], r["losses"][0], rtol=1e-4, atol=1e-6, err_msg=run)
        # lr 1e-3 over 3 steps moves the masters by ~3e-3; the two paths agree to float rounding (bf16
        # weights: a master one ulp apart can round its bf16 copy the other way, hence the looser bound)
        assert r["moved"] > 1e-3, run
        assert r["master_max_diff"] < (1e-6 if precision == "fp32" else 2e-5), (run, r["master_max_diff"])


def test_alignflow_step_kernel_matches_torchs_under_zero(tmp_path):
    """optim.step_kernel alignflow (the CUDA C++ kernel in the emulator) against torch's fused AdamW
    kernel, both with fused_clip on, on two ranks, clipping active in every step: without ZeRO under
    bf16-mixed with train.bf16_weight_copies (the kernel writes the copies the forward reads), ZeRO 1
    (fp32), 2 and 3 (bf16: fp32 master partitions, bf16 weights)."""
    from kernels import _cuda

    if _cuda.emulator_missing():
        pytest.skip(_cuda.emulator_missing())
    _cuda.build_emulated(_cuda.SOURCES["adamw"])  # built here, so the ranks only load it
    runs = "0:bf16-mixed:copies,1:fp32,2:bf16,3:bf16"
    raw = tiny_config(tmp_path / "run", tmp_path / "data", optim={"lr": 1e-3, "warmup_steps": 0, "grad_clip": CLIP},
                      train={"debug_fixed_batch": True})
    out = tmp_path / "result.json"
    launch(["--config", write_config(raw, tmp_path / "config.yaml"), "--zero3-json",
            write_zero3_json(tmp_path / "zero3.json"), "--runs", runs, "--steps", "3", "--out", str(out),
            "--compare", "step_kernel"], module="tests.engine.optim_worker", env_extra={"ALIGNFLOW_CUEMU": "1"})
    results = json.loads(out.read_text())
    assert list(results) == runs.split(",")
    for run, r in results.items():
        stage, precision, *copies = run.split(":")
        print(run, "launches", r["launches"], "master_max_diff", r["master_max_diff"], "copies", r["copies"])
        if copies:  # each copy its master rounded, written in the optimizer's step by either kernel
            assert r["copies"][0] == r["copies"][1] > 0 and r["copies_by_optimizer"] == [True, True], (run, r)
            assert r["copies_equal"] == [True, True], (run, r)
        assert r["step_kernel"] == ["torch", "alignflow"] and r["zero_stage"] == int(stage), (run, r)
        assert r["launches"][0] == 0 and r["launches"][1] >= 3, (run, r["launches"])  # the kernel ran every step
        torch_kernel, alignflow = (np.array(x) for x in r["grad_norms"])
        assert (alignflow > 2 * CLIP).all(), (run, alignflow)  # every step clipped
        np.testing.assert_allclose(alignflow, torch_kernel, rtol=1e-5, err_msg=run)
        np.testing.assert_allclose(r["losses"][1], r["losses"][0], rtol=1e-5, atol=1e-6, err_msg=run)
        assert r["moved"] > 1e-3, run
        # the same bounds as the fused_clip comparison above: float rounding (and for bf16 weights a
        # master one ulp apart rounding its bf16 copy the other way)
        assert r["master_max_diff"] < (1e-6 if precision == "fp32" else 2e-5), (run, r["master_max_diff"])


def test_a_nan_gradient_is_skipped_as_deepspeeds_overflow_check_skips_it(tmp_path):
    """ZeRO 1 and 2, bf16, two ranks, a NaN put into one gradient at step 2 of 4 (the loss finite), lr in
    warmup: with DeepSpeed's bf16 overflow check (bf16.check_grad_overflow true in the JSON) and without
    it (as engine.config generates it with optim.fused_clip: ClippedAdamW skips the step on the device),
    the same step is skipped, logged and counted, the lr schedule holds, and the masters, losses and
    optimizer step counts are bitwise the same."""
    runs = "1:bf16,2:bf16"
    raw = tiny_config(tmp_path / "run", tmp_path / "data", optim={"lr": 1e-3, "warmup_steps": 3, "grad_clip": CLIP},
                      train={"debug_fixed_batch": True})
    out = tmp_path / "result.json"
    launch(["--config", write_config(raw, tmp_path / "config.yaml"), "--zero3-json",
            write_zero3_json(tmp_path / "zero3.json"), "--runs", runs, "--steps", "4", "--out", str(out),
            "--compare", "overflow_check", "--nan-step", "1"], module="tests.engine.optim_worker")
    results = json.loads(out.read_text())
    assert list(results) == runs.split(",")
    for run, r in results.items():
        assert r["check_grad_overflow"] == [True, False] and r["fused_clip"] == [True, True], (run, r)
        for grad_norms in r["grad_norms"]:  # the second step's: DeepSpeed's inf for an overflow
            assert np.isinf(grad_norms[1]) and np.isfinite(np.delete(grad_norms, 1)).all(), (run, grad_norms)
        assert r["grad_norms"][0] == r["grad_norms"][1], run
        assert r["skipped"] == [[0, 1, 1, 1]] * 2, (run, r["skipped"])
        assert r["lrs"][0] == r["lrs"][1] and r["lrs"][0][1] == r["lrs"][0][2], (run, r["lrs"])  # held at the skip
        assert r["optimizer_steps"] == [[3.0], [3.0]], (run, r["optimizer_steps"])
        assert r["losses"][0] == r["losses"][1], run
        assert r["moved"] > 1e-4 and r["masters_equal"], (run, r["master_max_diff"])
