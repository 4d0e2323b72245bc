"""optim.fused_clip: ClippedAdamW (the clip inside torch's fused AdamW step) against the reference
path, clip_grad_norm_ then AdamW, over a few steps with fresh random gradients; the clip divisor
against torch's and DeepSpeed's formulas; the config switch. (Under DeepSpeed ZeRO 0-3 on two ranks:
test_optim_distributed.py.)"""
import copy

import pytest
import torch

from engine.config import ConfigError, deepspeed_config, from_dict, resolve_fused_clip, validate
from engine.optim import ClippedAdamW, clip_divisor
from tests.engine.trainer_fixtures import tiny_config

SHAPES = [(72, 5), (1152,), (1,), (3, 7, 2)]  # awkward sizes: not multiples of the kernel's vector width


def params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def run(optimizer_factory, clip: float | None, steps: int, seed: int, grad_scale: float):
    """`steps` steps on fresh random gradients (the same for every optimizer); with `clip`, the
    reference's clip_grad_norm_ first. Returns the parameters and the norms."""
    ps = params(seed)
    opt = optimizer_factory(ps)
    g = torch.Generator().manual_seed(seed + 1)
    norms = []
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * grad_scale
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(ps, clip))
        opt.step()
        if clip is None:
            norms.append(opt.last_grad_norm.clone())
    return [p.detach().clone() for p in ps], torch.stack(norms)


ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)


@pytest.mark.parametrize("grad_scale, max_norm, clipped", [(1.0, 0.5, True), (0.01, 10.0, False)])
def test_clipped_adamw_takes_the_reference_steps(grad_scale, max_norm, clipped):
    steps, seed = 5, int(torch.randint(0, 2 ** 31, ()))  # fresh inputs every run
    fused, fused_norms = run(lambda ps: ClippedAdamW(ps, max_norm=max_norm, **ADAMW), None, steps, seed, grad_scale)
    for reference_fused in (True, False):  # torch's fused kernel, and the default (foreach) AdamW
        ref, ref_norms = run(lambda ps: torch.optim.AdamW(ps, fused=reference_fused or None, **ADAMW), max_norm,
                             steps, seed, grad_scale)
        # the norm is clip_grad_norm_'s own (the same foreach reduction)
        torch.testing.assert_close(fused_norms, ref_norms, rtol=0, atol=0)
        assert bool((ref_norms > max_norm).all()) == clipped
        for a, b, shape in zip(fused, ref, SHAPES):
            if not clipped and reference_fused:  # divisor 1: the same kernel on the same gradients
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{shape}")
            else:  # g / d against g * (1 / d): one rounding of the gradient apart
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{shape}")
    # the steps moved every tensor; a one-element tensor's Adam steps on random-sign gradients can cancel
    # (seen at 3e-5 over 5 steps; 17 of 800 seeds fell under 1e-3), so it is held to moving at all
    start = params(seed)
    assert all((a - s).abs().max() > (1e-3 if s.numel() > 1 else 0) for a, s in zip(fused, start))


def test_the_divisor_is_torchs_and_deepspeeds_clip():
    norms = torch.tensor([0.0, 0.3, 1.0, 2.5, 1e4])
    for max_norm in (0.5, 1.0):
        d = torch.stack([clip_divisor(n, max_norm) for n in norms])
        torch_coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        torch.testing.assert_close(1.0 / d, torch_coef, rtol=1e-6, atol=0)
        deepspeed = torch.clamp((norms + 1e-6) / max_norm, min=1.0)  # stage_1_and_2.unscale_and_clip_grads
        torch.testing.assert_close(d, deepspeed, rtol=0, atol=0)
    # under a loss scale: the norm is of the scaled gradients, the divisor unscales too
    torch.testing.assert_close(clip_divisor(torch.tensor(8.0), 1.0, loss_scale=4.0), torch.tensor(4.0 * (2 + 1e-6)))
    assert not torch.isfinite(clip_divisor(torch.tensor(float("nan")), 1.0))


def test_a_step_without_gradients_and_bad_arguments():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ClippedAdamW([p], max_norm=1.0, lr=0.1)
    assert opt.step() is None and torch.equal(p.detach(), torch.ones(3))
    with pytest.raises(ValueError, match="fused"):
        ClippedAdamW([p], max_norm=1.0, fused=False)
    with pytest.raises(ValueError, match="max_norm"):
        ClippedAdamW([p], max_norm=0.0)


def test_state_dict_is_adamws():
    """Checkpoints move between the switch's two settings: the state is torch AdamW's."""
    ps = params(0)
    opt = ClippedAdamW(ps, max_norm=1.0, **ADAMW)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    other = torch.optim.AdamW(copy.deepcopy(ps), fused=True, **ADAMW)
    other.load_state_dict(opt.state_dict())
    assert other.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def config(tmp_path, **optim):
    return from_dict(tiny_config(tmp_path / "run", tmp_path / "data", optim={"grad_clip": 1.0, **optim}))


def test_switch_resolves_and_refuses(tmp_path):
    cfg = config(tmp_path)
    assert resolve_fused_clip(cfg, "cuda", "bf16") and resolve_fused_clip(cfg, "cuda", "bf16-mixed")
    assert not resolve_fused_clip(cfg, "cpu", "fp32")  # the CPU path keeps its numerics bitwise
    assert not resolve_fused_clip(cfg, "cuda", "fp16")
    assert not resolve_fused_clip(config(tmp_path, grad_clip=0.0), "cuda", "bf16")
    assert not resolve_fused_clip(config(tmp_path, fused_clip="false"), "cuda", "bf16")
    assert resolve_fused_clip(config(tmp_path, fused_clip="true"), "cpu", "fp32")
    for optim, fragment in [(dict(fused_clip="true", fused="false"), "optim.fused 'false'"),
                            (dict(fused_clip="true", grad_clip=0.0), "optim.grad_clip 0")]:
        with pytest.raises(ConfigError, match=rf"optim.fused_clip: 'true': .*{fragment}"):
            validate(config(tmp_path, **optim), cuda_available=False, disk=False)
    cfg = from_dict(tiny_config(tmp_path / "run", tmp_path / "data", optim=dict(fused_clip="true"),
                                train=dict(precision="fp16")))
    with pytest.raises(ConfigError, match=r"optim.fused_clip: 'true': .*fp16"):
        validate(cfg, cuda_available=True, disk=False)


def test_deepspeed_keeps_its_clip_setting_under_zero_only(tmp_path):
    """Without ZeRO the optimizer clips (DeepSpeed's gradient_clipping 0); under ZeRO DeepSpeed keeps
    the setting (it computes the norm and its checkpoints record it) and hands the divisor over."""
    cfg = config(tmp_path, fused_clip="true")
    cfg.train.zero_stage = 0
    assert deepspeed_config(cfg, 1, "fp32", "cpu")["gradient_clipping"] == 0.0
    cfg.train.zero_stage = 2
    assert deepspeed_config(cfg, 1, "fp32", "cpu")["gradient_clipping"] == 1.0
    cfg = config(tmp_path)  # auto on the CPU: off, DeepSpeed clips as before
    cfg.train.zero_stage = 0
    assert deepspeed_config(cfg, 1, "fp32", "cpu")["gradient_clipping"] == 1.0


def test_deepspeed_config_leaves_the_overflow_check_to_the_fused_clip(tmp_path):
    """bf16.check_grad_overflow: off where optim.fused_clip is on (ClippedAdamW skips a non-finite step),
    DeepSpeed's default (on) where it is off, and a DeepSpeed JSON's own value either way."""
    import json

    for stage in (0, 1, 2, 3):
        cfg = config(tmp_path, fused_clip="true")
        cfg.train.zero_stage = stage
        assert deepspeed_config(cfg, 1, "bf16", "cpu")["bf16"]["check_grad_overflow"] is False
        cfg = config(tmp_path, fused_clip="false")
        cfg.train.zero_stage = stage
        assert deepspeed_config(cfg, 1, "bf16", "cpu")["bf16"]["check_grad_overflow"] is True
    assert deepspeed_config(config(tmp_path), 1, "bf16", "cpu")["bf16"]["check_grad_overflow"] is True  # auto: off
    for explicit in (True, False):
        path = tmp_path / f"zero2_{explicit}.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"check_grad_overflow": explicit}}))
        for fused_clip in ("true", "false"):
            cfg = config(tmp_path, fused_clip=fused_clip)
            cfg.train.deepspeed_config = str(path)
            assert deepspeed_config(cfg, 1, "bf16", "cpu")["bf16"]["check_grad_overflow"] is explicit


def poisoned_bf16_copies(ps):
    return {p: torch.full(p.shape, float("nan"), dtype=torch.bfloat16) for p in ps}


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipping active, inactive
def test_bf16_copies_are_the_params_rounded_after_every_step(max_norm):
    ps = params(int(torch.randint(0, 2 ** 31, ())))
    opt = ClippedAdamW([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}], max_norm=max_norm, **ADAMW)
    assert not opt.writes_bf16_copies
    copies = poisoned_bf16_copies(ps[1:])  # one param without a copy
    opt.set_bf16_copies(copies)
    assert opt.writes_bf16_copies
    for p, c in copies.items():  # written when set
        assert torch.equal(c, p.detach().to(torch.bfloat16))
    for step in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape)
        before = [p.detach().clone() for p in ps]
        opt.step()
        assert all(not torch.equal(p.detach(), b) for p, b in zip(ps, before))
        for i, (p, c) in enumerate(copies.items()):
            assert torch.equal(c, p.detach().to(torch.bfloat16)), f"step {step} copy {i}"
    opt.set_bf16_copies(None)
    assert not opt.writes_bf16_copies


def test_bf16_copies_refuse_a_wrong_mapping():
    ps = params(0)
    opt = ClippedAdamW(ps, max_norm=1.0, **ADAMW)
    stranger = torch.nn.Parameter(torch.zeros(4, 4))
    for mapping, message in [
            ({ps[1]: torch.zeros(1151, dtype=torch.bfloat16)}, r"copy of param_groups\[0\]\['params'\]\[1\] is "
                                                               r"torch.bfloat16 \(1151,\) on cpu; allowed: torch.bfloat16 \(1152,\)"),
            ({ps[0]: torch.zeros(72, 5)}, r"copy of param_groups\[0\]\['params'\]\[0\] is torch.float32 \(72, 5\)"),
            ({stranger: torch.zeros(4, 4, dtype=torch.bfloat16)}, r"a param of shape \(4, 4\) .* does not hold")]:
        with pytest.raises(ValueError, match=message):
            opt.set_bf16_copies(mapping)
        assert not opt.writes_bf16_copies


def test_step_kernel_switch_validates(tmp_path):
    validate(config(tmp_path, fused_clip="true", step_kernel="alignflow"), cuda_available=False, disk=False)
    validate(config(tmp_path, step_kernel="alignflow"), cuda_available=True, disk=False)  # auto: on on CUDA
    for optim, cuda, fragment in [(dict(), False, "unless optim.fused_clip is on \\(it is 'auto' on cpu"),
                                  (dict(fused_clip="false"), True, "unless optim.fused_clip is on \\(it is 'false'")]:
        with pytest.raises(ConfigError, match=rf"optim.step_kernel: 'alignflow': 'torch' {fragment}"):
            validate(config(tmp_path, step_kernel="alignflow", **optim), cuda_available=cuda, disk=False)
    cfg = from_dict(tiny_config(tmp_path / "run", tmp_path / "data", optim=dict(step_kernel="alignflow"),
                                train=dict(precision="fp16")))
    with pytest.raises(ConfigError, match=r"optim.step_kernel: 'alignflow': 'torch' with train.precision fp16"):
        validate(cfg, cuda_available=True, disk=False)
    from engine.checkpoint import resume_rule

    assert resume_rule("optim.step_kernel")[0] == "apply"  # both kernels keep torch AdamW's state


def test_the_log_names_the_step_kernel(monkeypatch):
    from engine.optim import describe_step_kernel

    assert describe_step_kernel("torch") == "torch's fused AdamW"
    monkeypatch.delenv("ALIGNFLOW_CUEMU", raising=False)
    assert "csrc/adamw.cu (on CPU tensors kernels.reference_adamw_step" in describe_step_kernel("alignflow")
    monkeypatch.setenv("ALIGNFLOW_CUEMU", "1")
    assert "csrc/adamw.cu (on CPU tensors the emulator;" in describe_step_kernel("alignflow")
