"""Resume policy (README "Resume policy"): a resume whose config differs from the checkpoint's either
applies the new value or is refused before DeepSpeed loads anything, as one line naming the key and
the checkpoint's value. One CPU rank in this process; its group stays up for the later in-process
trainer files (test_train.py ends it), as a group ended under DeepSpeed leaves it a stale clone."""
import os

import pytest
import torch

import kernels
from engine import checkpoint as ckpt
from engine.config import ConfigError, from_dict
from tests.engine.trainer_fixtures import tiny_config


@pytest.fixture(autouse=True)
def _keep_kernel_backend():
    with kernels.use_backend(kernels.get_backend()):
        yield


def trainer_for(raw):
    from engine.trainer import Trainer

    return Trainer(from_dict(raw))


def merged(raw, **sections):
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section, values in sections.items():
        out[section] = {**out[section], **values} if isinstance(out.get(section), dict) else values
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A two-step checkpoint of the tiny config (warm-up 2, lr 1e-3) and the config it was made with."""
    tmp = tmp_path_factory.mktemp("resume")
    raw = tiny_config(tmp / "run", tmp / "data", train=dict(max_steps=4))
    trainer = trainer_for(raw)
    trainer.train_step()
    trainer.train_step()
    path = trainer.save()
    weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    return raw, path, weights, tmp


def resume_raw(saved, name, **sections):
    raw, path, _, tmp = saved
    sections["train"] = {"output_dir": str(tmp / name), **sections.get("train", {})}
    sections["checkpoint"] = {"resume": path, **sections.get("checkpoint", {})}
    return merged(raw, **sections)


@pytest.mark.parametrize("sections, message", [
    ({"model": {"hidden_size": 64, "num_heads": 2}}, r"model.hidden_size: 64: 32, the value checkpoint .*step_00000002"),
    ({"model": {"depth": 3}}, r"model.depth: 3: 2, the value checkpoint"),
    ({"model": {"class_dropout_prob": 0.2}}, r"model.class_dropout_prob: 0.2: 0.1, the value checkpoint"),
    ({"train": {"zero_stage": 1}}, r"train.zero_stage: 1: ZeRO stage 2, the stage checkpoint .* resolves to stage 1"),
    ({"train": {"deepspeed_config": "configs/deepspeed/zero3.json"}},
     r"train.deepspeed_config: 'configs/deepspeed/zero3.json': ZeRO stage 2, the stage checkpoint"),
    ({"train": {"max_steps": 1}}, r"train.max_steps: 1: at least 2, the step of checkpoint"),
    ({"train": {"seed": 4}}, r"train.seed: 4: 3, the value checkpoint .*RNG streams"),
    ({"train": {"global_batch_size": 16}}, r"train.global_batch_size: 16: 8, the value checkpoint"),
    ({"data": {"batch_size": 2}}, r"data.batch_size: 2: 4, the value checkpoint"),
    ({"data": {"seed": 1}}, r"data.seed: 1: 0, the value checkpoint"),
    ({"data": {"random_flip": False}}, r"data.random_flip: false: True, the value checkpoint"),
    ({"transport": {"path": "cosine"}}, r"transport.path: 'cosine': 'linear', the value checkpoint"),
    ({"latent": {"scale": 0.5}}, r"latent.scale: 0.5: 1.0, the value checkpoint"),
    ({"encoders": [{"name": "test_vit", "pretrained": False, "resolution": 16, "image_size": 64,
                    "model_kwargs": {"depth": 1}}]}, r"encoders\[0\].model_kwargs: \{'depth': 1\}: \{\}, the value"),
    ({"eval": {"every": 2, "num_images": 4, "real_images": 4, "batch_size": 2}}, None),  # a curve may start
])
def test_a_resume_that_changes_a_refused_key_is_one_line_naming_it(saved, sections, message):
    raw = resume_raw(saved, "refused", **sections)
    if message is None:
        assert trainer_for(raw).step == 2
        return
    with pytest.raises(ConfigError) as info:
        trainer_for(raw)
    text = str(info.value)
    assert "\n" not in text and len(text) < 400, text
    import re
    assert re.match(message, text), text


def test_optim_lr_and_warmup_overrides_are_applied(saved):
    """DeepSpeed restores the saved param groups and lr schedule; the resume writes this config's
    optim.* back, so an lr override is not silently ignored."""
    _, _, weights, _ = saved
    plain = trainer_for(resume_raw(saved, "plain"))
    for name, value in plain.engine.module.named_parameters():
        torch.testing.assert_close(value.detach(), weights[name], rtol=0, atol=0)
    assert plain.train_step()["lr"] == 1e-3  # warm-up over: the full lr

    lower = trainer_for(resume_raw(saved, "lr", optim={**saved[0]["optim"], "lr": 4e-4, "weight_decay": 0.01,
                                                       "betas": [0.8, 0.99]}))
    group = lower.optimizer.param_groups[0]
    assert group["lr"] == 4e-4 and group["weight_decay"] == 0.01 and tuple(group["betas"]) == (0.8, 0.99)
    moments = [state["exp_avg"] for state in lower.optimizer.optimizer.state.values()]
    assert moments and all(float(m.abs().max()) > 0 for m in moments)  # Adam's moments loaded, not reset
    assert int(lower.scheduler.last_epoch) == 2
    metrics = [lower.train_step()["lr"] for _ in range(2)]
    assert metrics == [4e-4, 4e-4]

    warm = trainer_for(resume_raw(saved, "warmup", optim={**saved[0]["optim"], "warmup_steps": 10}))
    assert [warm.train_step()["lr"] for _ in range(2)] == pytest.approx([1e-3 * 3 / 10, 1e-3 * 4 / 10], rel=1e-12)


def test_keys_a_resume_may_change_are_applied_and_logged(saved, caplog):
    raw = resume_raw(saved, "moved", data={**saved[0]["data"], "num_workers": 1},
                     logging={**saved[0]["logging"], "log_every": 2}, ema={"decay": 0.5})
    with caplog.at_level("INFO"):
        trainer = trainer_for(raw)
    assert trainer.step == 2 and trainer.ema.decay == 0.5
    text = "\n".join(r.getMessage() for r in caplog.records)
    for line in ("resume: data.num_workers 0 -> 1 (applied from step 2)", "resume: ema.decay 0.9 -> 0.5",
                 "resume: train.output_dir "):
        assert line in text, text


def test_every_config_key_has_a_resume_rule():
    """A new config key must be given a rule on purpose: every leaf of the default config is matched by
    an entry of RESUME_RULES (its section's at least), none by the fallback."""
    from engine.config import ExperimentConfig

    raw = tiny_config("/tmp/x", "/tmp/y")
    for key in ckpt.config_leaves(ExperimentConfig.from_dict(raw)):
        assert ckpt.resume_rule(key)[1] != "a key the resume policy does not know", key


# ----------------------------------------------------------------------------------------------
# A truncated or unreadable checkpoint: named, and the newest complete older one is used
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Checkpoints at steps 1 and 2 of one run, with the weights at each."""
    tmp = tmp_path_factory.mktemp("fallback")
    raw = tiny_config(tmp / "run", tmp / "data", train=dict(max_steps=4))
    trainer = trainer_for(raw)
    weights = {}
    for step in (1, 2):
        trainer.train_step()
        trainer.save()
        weights[step] = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    return raw, trainer.checkpoint_dir, weights, tmp


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("damage", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt",
                                    "trainer_rank0.pt", "latest"])
def test_a_truncated_checkpoint_is_named_and_the_older_one_resumed(two_checkpoints, damage, caplog):
    import shutil

    raw, checkpoint_dir, weights, tmp = two_checkpoints
    run = tmp / f"run_{damage}"
    shutil.copytree(os.path.dirname(checkpoint_dir), run)
    newest = run / "checkpoints" / "step_00000002"
    if damage == "latest":
        (run / "checkpoints" / "latest").write_text("step_000")  # a torn write of the tag
        bad = str(run / "checkpoints" / "latest")
    else:
        bad = str(newest / damage)
        truncate(bad)
    with caplog.at_level("WARNING"):
        trainer = trainer_for(merged(raw, train={"output_dir": str(run)}))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(bad in w for w in warnings), warnings
    expected = 2 if damage == "latest" else 1  # a bad `latest`: the newest complete checkpoint
    assert trainer.step == expected
    for name, value in trainer.engine.module.named_parameters():
        torch.testing.assert_close(value.detach(), weights[expected][name], rtol=0, atol=0)
    if damage == "trainer_rank0.pt":
        # named alone, the truncated checkpoint is refused naming the file (no silent fallback)
        with pytest.raises(ckpt.CorruptCheckpointError, match=f"{bad} is truncated or unreadable"):
            trainer_for(merged(raw, train={"output_dir": str(tmp / "other")}, checkpoint={"resume": str(newest)}))


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(two_checkpoints):
    import shutil

    raw, checkpoint_dir, _, tmp = two_checkpoints
    run = tmp / "run_all_bad"
    shutil.copytree(os.path.dirname(checkpoint_dir), run)
    for step in (1, 2):
        truncate(run / "checkpoints" / f"step_{step:08d}" / ckpt.EMA_FILE)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"no readable checkpoint .*step_00000002.*step_00000001"):
        trainer_for(merged(raw, train={"output_dir": str(run)}))


def test_safe_load_names_a_truncated_file(tmp_path):
    path = str(tmp_path / "state.pt")
    torch.save({"x": torch.arange(1000)}, path)
    truncate(path)
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"^{path}: this trainer state is truncated or unreadable"):
        ckpt.safe_load(path, "trainer state")
    torch.save({"ema": {}}, str(tmp_path / ckpt.EMA_FILE))
    assert ckpt.check_readable(str(tmp_path)) == f"{path} is truncated or unreadable (File is not a zip file)"


# ----------------------------------------------------------------------------------------------
# Faults during a run: a full disk while saving; a run stopped by non-finite losses saves first
# ----------------------------------------------------------------------------------------------

def mount_tmpfs(path, size: str):
    """A small tmpfs at `path` (root needed: skipped with the reason otherwise); returns an unmount."""
    import subprocess

    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root and mount(8) needed): {proc.stderr.strip()[:200]}")
    return lambda: subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(directory) -> None:
    """Write a ballast file into `directory` until its filesystem is full."""
    with open(os.path.join(directory, "ballast"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_while_saving_is_one_error_and_leaves_latest(tmp_path, caplog):
    raw = tiny_config(tmp_path / "run", tmp_path / "data", train=dict(max_steps=4))
    unmount = mount_tmpfs(tmp_path / "run" / "checkpoints", "16m")
    try:
        trainer = trainer_for(raw)
        trainer.train_step()
        trainer.save()
        trainer.train_step()
        fill_disk(trainer.checkpoint_dir)
        with pytest.raises(ckpt.CheckpointWriteError) as info:
            trainer.save()
        text = str(info.value)
        assert "\n" not in text
        assert "No space left on device (ENOSPC)" in text and "rank 0: " in text, text
        assert f"{trainer.checkpoint_dir}/.tmp-step_00000002/" in text and "step_00000001 stays latest" in text, text
        left = sorted(n for n in os.listdir(trainer.checkpoint_dir) if not n.startswith("zero_to_"))  # DeepSpeed's scripts
        assert left == ["ballast", "latest", "step_00000001"]
        assert ckpt.check_readable(os.path.join(trainer.checkpoint_dir, "step_00000001")) is None
    finally:
        unmount()


def test_nonfinite_stop_saves_the_last_good_step_exactly(tmp_path, caplog):
    """checkpoint.every 0 (a save only at the end): four micro-batches in, two NaN losses in a row stop
    the run. It first saves step 2 exactly as a checkpoint at step 2 would be, so a resume (here with the
    NaNs gone) gives bitwise the losses of a run that never failed."""
    from engine.trainer import NonFiniteLossError

    failing = tiny_config(tmp_path / "run", tmp_path / "data",
                          train=dict(max_steps=4, max_nonfinite_in_row=2, debug_nonfinite_steps=[4, 5]))
    with caplog.at_level("WARNING"), pytest.raises(NonFiniteLossError):
        trainer_for(failing).fit()
    checkpoint_dir = str(tmp_path / "run" / "checkpoints")
    assert ckpt.latest_tag(checkpoint_dir) == "step_00000002"
    assert any("saving the last good state (step 2) before stopping" in r.getMessage() for r in caplog.records)

    reference = trainer_for(tiny_config(tmp_path / "reference", tmp_path / "data", train=dict(max_steps=4)))
    expected = [reference.train_step()["loss"] for _ in range(4)][2:]
    resumed = trainer_for(merged(failing, train={"debug_nonfinite_steps": []}))
    assert resumed.step == 2 and resumed.micro_attempts == 4 and resumed.nonfinite_in_row == 0
    assert [resumed.train_step()["loss"] for _ in range(2)] == expected
    for (name, a), b in zip(resumed.engine.module.named_parameters(), reference.engine.module.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, msg=name)


def test_an_error_inside_the_optimizer_update_is_not_saved(tmp_path, caplog):
    trainer = trainer_for(tiny_config(tmp_path / "run", tmp_path / "data", train=dict(max_steps=4)))
    real_step, calls = trainer.engine.step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the boundary of optimizer step 2
            raise RuntimeError("simulated failure in the update")
        return real_step(*args, **kwargs)

    trainer.engine.step = step
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="simulated"):
        trainer.fit()
    assert ckpt.latest_tag_or_none(trainer.checkpoint_dir) is None
    assert any("the last good state (step 1) is not saved: it came during the optimizer update" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# weights_only through DeepSpeed's own files, for every ZeRO stage and bf16
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, precision", [(1, "fp32"), (3, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16")])
def test_deepspeed_files_resume_through_weights_only(tmp_path, stage, precision, monkeypatch):
    """Every file of the resume, DeepSpeed's ZeRO optimizer and model files included, is read with
    torch.load(weights_only=True) (the four allowed DeepSpeed classes cover them), and the fp32 master
    weights and the EMA come back bitwise."""
    from deepspeed.utils import safe_get_full_fp32_param

    from tests.engine.trainer_fixtures import write_zero3_json

    ds = write_zero3_json(tmp_path / "zero3.json") if stage == 3 else "configs/deepspeed/zero1.json"
    raw = tiny_config(tmp_path / "run", tmp_path / "data",
                      train=dict(max_steps=3, precision=precision, deepspeed_config=ds, zero_stage=stage))

    def masters(trainer):
        out = {}
        for name, param in trainer.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)  # None where DeepSpeed keeps no separate master (ZeRO-1)
            out[name] = (param if full is None else full).detach().float().cpu().clone()
        return out

    first = trainer_for(raw)
    first.train_step()
    first.save()
    want, want_ema = masters(first), first.ema.full_state_dict()

    loads = []
    real_load = torch.load

    def recording_load(path, *args, **kwargs):
        loads.append((str(path), kwargs.get("weights_only")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    resumed = trainer_for(raw)
    monkeypatch.undo()
    assert resumed.step == 1 and resumed.engine.zero_optimization_stage() == stage
    names = {os.path.basename(path) for path, _ in loads}
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in names or any("optim_states" in n for n in names), names
    assert any("model_states" in n for n in names) and "trainer_rank0.pt" in names, names
    assert all(weights_only is True for _, weights_only in loads), loads
    for name, value in masters(resumed).items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
    for name, value in resumed.ema.full_state_dict().items():
        torch.testing.assert_close(value, want_ema[name], rtol=0, atol=0, msg=name)
