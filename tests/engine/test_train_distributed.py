"""Two CPU ranks under the deepspeed launcher (gloo): ZeRO-2 and ZeRO-3 training with the sharded EMA
checked against a reference built from the gathered fp32 master weights, exact resume, and the
README's main-job command in a shortened form."""
import json

import numpy as np
import pytest

from tests.engine.trainer_fixtures import launch, tiny_config, write_config, write_zero3_json

STEPS = 12


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin_data")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, data_root):
    """The same fixed-batch run under ZeRO-2 and ZeRO-3 on two ranks."""
    results = {}
    for stage in (2, 3):
        tmp = tmp_path_factory.mktemp(f"zero{stage}")
        ds = "configs/deepspeed/zero2.json" if stage == 2 else write_zero3_json(tmp / "zero3.json")
        raw = tiny_config(tmp / "run", data_root, train=dict(max_steps=STEPS, debug_fixed_batch=True,
                                                             deepspeed_config=ds))
        out = tmp / "result.json"
        launch(["--config", write_config(raw, tmp / "config.yaml"), "--mode", "ema", "--out", str(out)],
               module="tests.engine.dist_worker")
        results[stage] = json.loads(out.read_text())
    return results


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_zero_training(zero_runs, stage):
    result = zero_runs[stage]
    assert result["world_size"] == 2 and result["zero_stage"] == stage
    if stage == 3:
        assert result["partitioned_params"] > 0  # parameters really are sharded across the ranks
    losses = np.array(result["losses"])
    assert len(losses) == STEPS and np.isfinite(losses).all()
    # the loss on one fixed batch falls (fresh noise and times each step, so compare averages)
    assert losses[-3:].mean() < losses[:3].mean() - 0.05, losses
    assert np.isfinite(result["grad_norms"]).all()
    # sharded EMA == decay-weighted average of the gathered fp32 master weights
    assert result["ema_keys"] == sorted(result["reference_keys"])
    assert result["ema_max_error"] < 2e-6, (result["ema_worst"], result["ema_max_error"])
    assert result["ema_vs_initial"] > 1e-4 and result["masters_moved"] > 1e-4


def test_zero2_and_zero3_agree(zero_runs):
    # Same seed, data and fp32 math: the two sharding schemes give the same loss sequence up to
    # reduction order.
    np.testing.assert_allclose(zero_runs[2]["losses"], zero_runs[3]["losses"], rtol=1e-4, atol=1e-5)


def test_zero3_with_fused_bias_grad_trains_as_without(zero_runs, tmp_path, data_root):
    """model.fused_bias_grad under ZeRO-3 with every parameter partitioned: attn.proj and mlp.fc2 hand
    a copy of their gathered bias on (the parameter itself is released after the module's forward), and
    the run gives ZeRO-3's losses without the switch (fp32; the torch backend adds the bias in fp32)."""
    ds = write_zero3_json(tmp_path / "zero3.json")
    raw = tiny_config(tmp_path / "run", data_root, train=dict(max_steps=STEPS, debug_fixed_batch=True,
                                                              deepspeed_config=ds))
    raw["model"]["fused_bias_grad"] = True
    out = tmp_path / "result.json"
    launch(["--config", write_config(raw, tmp_path / "config.yaml"), "--mode", "ema", "--out", str(out)],
           module="tests.engine.dist_worker")
    result = json.loads(out.read_text())
    assert result["zero_stage"] == 3 and result["partitioned_params"] > 0
    np.testing.assert_allclose(result["losses"], zero_runs[3]["losses"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (3, "bf16")])
def test_exact_resume_two_ranks(tmp_path, data_root, stage, precision):
    ds = "configs/deepspeed/zero2.json" if stage == 2 else write_zero3_json(tmp_path / "zero3.json")
    raw = tiny_config(tmp_path / "run", data_root, train=dict(max_steps=6, precision=precision, deepspeed_config=ds))
    out = tmp_path / "result.json"
    launch(["--config", write_config(raw, tmp_path / "config.yaml"), "--mode", "resume", "--out", str(out)],
           module="tests.engine.dist_worker")
    result = json.loads(out.read_text())
    assert result["zero_stage"] == stage and result["precision"] == precision
    assert result["init_master_error"] == 0.0  # fp32 masters start at the fp32 init, not its bf16 rounding
    assert result["resumed_at"] == 3
    # bit-identical: same weights, optimizer state, data position and RNG streams on every rank
    assert result["losses_b"] == result["losses_a"][3:], result
    assert result["ema_diff"] == 0.0


def test_main_job_short(tmp_path, data_root):
    """`deepspeed --num_gpus 2 --module engine.train --config configs/builtin_cpu.yaml`, shortened:
    bootstraps the encoder, trains, checkpoints, writes sample grids, the npz and the loss curve, and
    evaluates online on both ranks (the built-in encoder figure, and Inception metrics against a
    reference batch with the random test Inception) at steps 0, 2 and 4."""
    from engine.evaluate import write_reference_batch

    run = tmp_path / "run"
    ref = write_reference_batch(str(tmp_path / "ref.npz"),
                                np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    overrides = [f"train.output_dir={run}", "train.max_steps=4", "train.bootstrap_encoder_steps=3",
                 f"data.root={data_root}", "data.builtin_images_per_class=8", "data.batch_size=4",
                 "data.num_workers=0", "train.global_batch_size=8", "checkpoint.every=2", "logging.sample_every=2",
                 "sample.num_images=4", "sample.batch_size=4", "sample.grid_images=4", "sample.num_steps=2",
                 "model.depth=2", "model.hidden_size=32", "model.encoder_depth=1",
                 "eval.every=2", "eval.num_images=8", "eval.batch_size=3", "eval.num_steps=2", f"eval.ref={ref}",
                 "eval.random_inception=true"]
    proc = launch(["--config", "configs/builtin_cpu.yaml", *overrides], timeout=600)  # 3 evaluations
    text = proc.stdout + proc.stderr
    assert "quality of the final EMA model (step 4): IS " in text and "encoder FD " in text
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 2, 4]  # eval.at_start (builtin_cpu.yaml), every 2, the end
    for record in evals:
        for key in ("fid", "sfid", "inception_score", "precision", "recall", "encoder_fd", "class_accuracy"):
            assert np.isfinite(record[key]), (key, record)
        assert record["fid"] > 0 and record["encoder_fd"] > 0 and 0 <= record["class_accuracy"] <= 1
    assert "rank 0/2 on cpu" in text
    assert "aligning projector 0 to encoder test_vit" in text and "bootstrapped encoder" in text
    for name in ("samples.png", "samples.npz", "loss_curve.png", "samples_step00000002.png", "metrics.jsonl"):
        assert (run / name).exists(), name
    assert len(list((run / "encoder").glob("*_bootstrap.pt"))) == 1
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert np.load(run / "samples.npz")["arr_0"].shape == (4, 32, 32, 3)
    done = [line for line in proc.stdout.splitlines() if line.startswith("done: ")]
    assert len(done) == 1 and json.loads(done[0][6:])["step"] == 4
    assert json.loads(done[0][6:])["eval"]["fid"] == evals[-1]["fid"]


def test_zero2_two_ranks_with_bf16_weight_copies_steps_as_without(tmp_path, data_root):
    """train.bf16_weight_copies under ZeRO-2 on two ranks, bf16-mixed, 2 micro-batches a step and the
    clip inside ClippedAdamW (optim.fused_clip, as on a GPU): DeepSpeed updates each rank's flat fp32
    partition and all-gathers the weights inside engine.step(); the copies refreshed after it equal the
    weights rounded to bf16 on both ranks after every step, and the run's losses and weights are the run
    without copies, bit for bit."""
    raw = tiny_config(tmp_path / "run", data_root,
                      train=dict(max_steps=3, global_batch_size=16, precision="bf16-mixed"),
                      optim=dict(fused_clip="true"))
    out = tmp_path / "result.json"
    launch(["--config", write_config(raw, tmp_path / "config.yaml"), "--out", str(out)],
           module="tests.engine.bf16_copies_worker")
    result = json.loads(out.read_text())
    without, with_copies = result["without"], result["with_copies"]
    assert with_copies["with_copies"] and not without["with_copies"] and not with_copies["written_by_optimizer"]
    assert with_copies["world_size"] == 2 and with_copies["zero_stage"] == 2 and with_copies["accum"] == 2
    assert with_copies["fresh"] == [True] * 3
    assert with_copies["losses"] == without["losses"] and len(without["losses"]) == 3
    assert result["weights_differ"] == [], result["weights_max_difference"]
