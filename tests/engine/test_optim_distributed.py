"""optim.fused_clip under DeepSpeed on two CPU ranks (gloo): for ZeRO 0 (the optimizer's own norm of
the averaged gradients), 1, 2 and 3 (DeepSpeed's norm of the partitioned gradients), the same fixed-seed run with DeepSpeed
clipping (fused_clip false) and with the clip inside the fused AdamW step gives the same losses, the
same logged gradient norms and the same fp32 master weights within float rounding, with clipping
active in every step (grad_clip below the norms)."""
import json

import numpy as np

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
