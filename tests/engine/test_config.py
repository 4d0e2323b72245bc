"""Experiment configuration: every shipped config loads and validates; bad input is an error naming
the key, the value and what is allowed, before any work starts."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from engine.config import (ConfigError, apply_overrides, from_dict, grad_accum_steps, load_config, resolve_precision,
                           validate)
from tests.engine.trainer_fixtures import REPO, env, tiny_config

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
# builtin_cpu.yaml evaluates (eval.encoder_metrics), and validation requires the metrics package then
METRICS_SKIP = "torch-fidelity is not installed (pip install -e \".[eval]\"): configs that evaluate do not validate"


def tiny(tmp_path, **sections):
    return tiny_config(tmp_path / "run", tmp_path / "data", **sections)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    if cfg.eval.every:
        pytest.importorskip("torch_fidelity", reason=METRICS_SKIP)
    world = 2 if "builtin" in path else 8
    validate(cfg, world_size=world, cuda_available="builtin" not in path, disk="builtin" in path)
    assert world * cfg.data.batch_size * grad_accum_steps(cfg, world) == cfg.train.global_batch_size
    if "builtin" not in path:  # the public recipe
        assert (cfg.optim.lr, cfg.optim.betas, cfg.train.global_batch_size, cfg.optim.grad_clip, cfg.ema.decay) \
            == (1e-4, [0.9, 0.999], 256, 1.0, 0.9999)
        assert cfg.model.class_dropout_prob == 0.1 and cfg.transport.proj_coeff == 0.5


def test_readme_training_commands_validate():
    """Every `--module engine.train` command in the README's Training block is a valid config for its
    GPU count (one GPU with every step-speed switch on included)."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    commands = re.findall(r"^deepspeed --num_gpus (\d+) --module engine\.train (--config \S+(?: +[a-z_]+\.[a-z_.]+=\S+)*)",
                          text, flags=re.M)
    assert any(gpus == "1" and "train.cuda_graphs=true" in rest for gpus, rest in commands), commands
    for gpus, rest in commands:
        words = shlex.split(rest)
        cfg = load_config(os.path.join(REPO, words[1]), words[2:])
        if cfg.eval.every:
            pytest.importorskip("torch_fidelity", reason=METRICS_SKIP)
        gpu = "builtin" not in words[1]
        validate(cfg, world_size=int(gpus), cuda_available=gpu, disk=not gpu)


def test_builtin_config_is_the_main_job():
    pytest.importorskip("torch_fidelity", reason=METRICS_SKIP)
    cfg = load_config(os.path.join(REPO, "configs", "builtin_cpu.yaml"))
    assert cfg.model.reg and cfg.model.car_flow == "joint" and cfg.model.z_dims
    assert cfg.data.source == "builtin" and cfg.train.bootstrap_encoder
    validate(cfg, world_size=2, cuda_available=False)
    validate(cfg, world_size=1, cuda_available=True)
    assert resolve_precision(cfg, "cpu") == "fp32" and resolve_precision(cfg, "cuda") == "bf16"


def expect_error(raw, *fragments, world_size=1, cuda_available=False):
    with pytest.raises(ConfigError) as info:
        validate(from_dict(raw), world_size=world_size, cuda_available=cuda_available, disk=False)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_unknown_keys_are_named(tmp_path):
    expect_error(tiny(tmp_path, optimizer={"lr": 1}), "optimizer: not a known key", "allowed")
    expect_error(tiny(tmp_path, train={"max_step": 3}), "train.max_step: not a known key", "max_steps")
    raw = tiny(tmp_path)
    raw["encoders"][0]["weight_path"] = "x"
    expect_error(raw, "weight_path")


def test_wrong_types_are_named(tmp_path):
    expect_error(tiny(tmp_path, train={"max_steps": "ten"}), "train.max_steps: 'ten': wrong type", "an integer")
    expect_error(tiny(tmp_path, train={"max_steps": True}), "train.max_steps: true", "an integer")
    expect_error(tiny(tmp_path, optim={"betas": 0.9}), "optim.betas: 0.9", "a list of a number")
    expect_error(tiny(tmp_path, train={"precision": "bf32"}), "train.precision: 'bf32'", "'bf16'")
    expect_error(tiny(tmp_path, ema={"decay": "high"}), "ema.decay: 'high'", "a number")


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    raw = yaml.safe_load("optim: {lr: 1e-4}")  # YAML 1.1 reads this as a string
    assert raw["optim"]["lr"] == "1e-4"
    cfg = from_dict({**tiny(tmp_path), "optim": raw["optim"]})
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)


def test_impossible_combinations(tmp_path):
    expect_error(tiny(tmp_path, train={"precision": "fp16"}), "train.precision: 'fp16'", "fp16 needs CUDA")
    validate(from_dict(tiny(tmp_path, train={"precision": "fp16"})), cuda_available=True, disk=False)
    expect_error(tiny(tmp_path, train={"device": "cuda"}), "train.device: 'cuda'")
    expect_error(tiny(tmp_path, train={"kernels_backend": "triton"}), "train.kernels_backend: 'triton'")
    # global batch 8 = world x micro 4 x accumulation: not with 3 ranks, nor with a fixed accumulation of 3
    expect_error(tiny(tmp_path), "train.global_batch_size: 8", "world size 3", "12", world_size=3)
    expect_error(tiny(tmp_path, train={"grad_accum_steps": 3}), "train.global_batch_size: 8", "= 24",
                 world_size=2)
    validate(from_dict(tiny(tmp_path, train={"grad_accum_steps": 1})), world_size=2, disk=False)
    expect_error(tiny(tmp_path, model={"encoder_depth": 5}), "model.encoder_depth: 5", "depth=2")
    expect_error(tiny(tmp_path, encoders=[]), "encoders: []", "one encoder per model.z_dims")
    expect_error(tiny(tmp_path, data={"num_classes": 7}), "data.num_classes: 7", "model.num_classes=4")
    expect_error(tiny(tmp_path, train={"deepspeed_config": "configs/deepspeed/zero9.json"}),
                 "train.deepspeed_config", "existing DeepSpeed JSON")
    expect_error(tiny(tmp_path, ema={"decay": 1.0}), "ema.decay: 1.0", "[0, 1)")
    expect_error(tiny(tmp_path, train={"zero_stage": 4}), "train.zero_stage: 4")
    expect_error(tiny(tmp_path, checkpoint={"keep_last": 0}), "checkpoint.keep_last: 0")


def test_eval_section_is_checked_before_any_work(tmp_path, monkeypatch):
    import numpy as np
    import torch

    expect_error(tiny(tmp_path, eval={"every": -1}), "eval.every: -1", ">= 0")
    expect_error(tiny(tmp_path, eval={"method": "rk4"}), "eval.method", "rk4", "euler")
    def on_disk(raw, *fragments):  # the file checks (validate(disk=True), as the trainer runs it)
        with pytest.raises(ConfigError) as info:
            validate(from_dict(raw), cuda_available=False)
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))

    on_disk(tiny(tmp_path, eval={"every": 10, "ref": str(tmp_path / "missing.npz")}), "eval.ref",
            "existing ADM reference batch")
    expect_error(tiny(tmp_path, encoders=[], model={"z_dims": [], "reg": False}, eval={"every": 10}),
                 "eval.encoder_metrics: true", "without encoders")
    expect_error(tiny(tmp_path, eval={"every": 10, "encoder_metrics": False}), "eval.encoder_metrics: false",
                 "nothing to evaluate")
    # a reference batch without Inception weights on the machine: the run stops now, naming the file and URL
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    on_disk(tiny(tmp_path, eval={"every": 10, "ref": str(tmp_path / "ref.npz")}), "eval.inception_weights",
            "eval.ref is set but", "weights-inception-2015-12-05", "torch-fidelity/releases")
    pytest.importorskip("torch_fidelity", reason=METRICS_SKIP)
    validate(from_dict(tiny(tmp_path, eval={"every": 10, "ref": str(tmp_path / "ref.npz"), "random_inception": True})))
    validate(from_dict(tiny(tmp_path, eval={"every": 10})))  # the encoder figure alone


def hide_torch_fidelity(monkeypatch, how: str) -> None:
    """This process as on a machine without torch-fidelity ("missing"), or with one whose import fails
    on a dependency of its own ("broken": torch-fidelity imports torchvision, PIL and tqdm)."""
    import builtins

    if how == "missing":
        for name in ["torch_fidelity", "torch_fidelity.metric_fid",
                     *(n for n in list(sys.modules) if n.startswith("torch_fidelity."))]:
            monkeypatch.setitem(sys.modules, name, None)  # `import` raises ModuleNotFoundError
        return
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("torch_fidelity"):
            raise ImportError("cannot import name 'InterpolationMode' from 'torchvision.transforms' (simulated)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)


@pytest.mark.parametrize("how, cause", [("missing", "ModuleNotFoundError: import of torch_fidelity"),
                                        ("broken", "ImportError: cannot import name 'InterpolationMode'")])
def test_missing_metrics_package_stops_the_run_before_any_work(tmp_path, monkeypatch, capsys, how, cause):
    """The main job evaluates (eval.encoder_metrics: the Frechet distance is torch-fidelity's): without
    that package importable, validation stops it at the start in one line naming the package, the pip
    extra, the config key that turns the metric off and the import's own error, instead of an
    ImportError at the first evaluation after the encoder bootstrap (the H200 run of 2026-12-04). The
    metrics are on only where the config turns them on, so none is skipped with a warning instead."""
    import numpy as np

    from engine.train import main

    hide_torch_fidelity(monkeypatch, how)
    config = os.path.join(REPO, "configs", "builtin_cpu.yaml")
    args = ["--config", config, "--validate-only", f"train.output_dir={tmp_path / 'run'}",
            f"data.root={tmp_path / 'data'}"]
    with pytest.raises(SystemExit) as info:
        main(args)
    stderr = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(stderr.splitlines()) == 1, stderr
    for fragment in (f"config error: {config}:", "eval.encoder_metrics: true: false, or install torch-fidelity",
                     'pip install -e ".[eval]"', cause):
        assert fragment in stderr, (fragment, stderr)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
    # the Inception metrics (eval.ref) name their own key
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError) as error:
        validate(from_dict(tiny(tmp_path, eval={"every": 10, "encoder_metrics": False, "ref": str(tmp_path / "ref.npz"),
                                                "random_inception": True})), cuda_available=False)
    assert str(error.value).startswith(f"eval.ref: '{tmp_path / 'ref.npz'}': null, or install torch-fidelity")
    assert cause in str(error.value)
    # with the metrics off (eval.encoder_metrics: false and no eval.ref, or eval.every: 0) nothing needs it
    validate(from_dict(tiny(tmp_path, eval={"every": 0})), cuda_available=False, disk=False)
    main([*args, "eval.every=0"])
    assert capsys.readouterr().out.strip() == f"{config}: ok"


def test_component_errors_carry_their_section(tmp_path):
    expect_error(tiny(tmp_path, model={"car_flow": "both"}), "model.car_flow: 'both'")
    expect_error(tiny(tmp_path, data={"decoder": "nvjpeg"}), "data.decoder: 'nvjpeg'")
    expect_error(tiny(tmp_path, transport={"path": "cubic"}), "transport.path: 'cubic'")


def test_overrides(tmp_path):
    raw = apply_overrides(tiny(tmp_path), ["optim.lr=3e-4", "train.max_steps=9", "encoders.0.image_size=32",
                                           "model.z_dims=[64]", "checkpoint.resume=none"])
    cfg = from_dict(raw)
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 9 and cfg.encoders[0].image_size == 32
    assert cfg.checkpoint.resume == "none"
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(tiny(tmp_path), ["optim.lr"])
    with pytest.raises(ConfigError, match="encoders.5"):
        apply_overrides(tiny(tmp_path), ["encoders.5.name=x"])


def test_deepspeed_config_merge(tmp_path):
    from engine.config import deepspeed_config

    cfg = from_dict(tiny(tmp_path, train={"zero_stage": 3}, optim={"grad_clip": 0.5}))
    ds = deepspeed_config(cfg, world_size=2, precision="bf16")
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    assert deepspeed_config(cfg, 1, "fp32")["gradient_accumulation_steps"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    cfg = from_dict(tiny(tmp_path, train={"deepspeed_config": str(bad)}))
    with pytest.raises(ConfigError, match="without a 'optimizer' section"):
        deepspeed_config(cfg, 1, "fp32")
    bad.write_text(json.dumps({"train_batch_size": 32}))
    with pytest.raises(ConfigError, match="train_batch_size=32 in it disagrees"):
        deepspeed_config(cfg, 1, "fp32")


def test_cli_reports_config_errors_before_any_work(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path, train={"global_batch_size": 7})))
    proc = subprocess.run([sys.executable, "-m", "engine.train", "--config", str(path), "--validate-only"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"config error: {path}:" in proc.stderr and "train.global_batch_size: 7" in proc.stderr
    assert "a multiple of" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_collective_timeout_is_checked(tmp_path):
    expect_error(tiny(tmp_path, train={"collective_timeout_s": 0}), "train.collective_timeout_s: 0",
                 "a number of seconds from 10 to 86400")
    expect_error(tiny(tmp_path, train={"collective_timeout_s": "soon"}), "train.collective_timeout_s", "soon")
    validate(from_dict(tiny(tmp_path, train={"collective_timeout_s": 60})), world_size=1, cuda_available=False,
             disk=False)
