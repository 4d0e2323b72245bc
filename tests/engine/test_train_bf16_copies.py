"""train.bf16_weight_copies in the trainer (one CPU rank in this process): under bf16-mixed the steps
with the copies are the steps without them, bit for bit, under ZeRO 0 and 2 with gradient accumulation;
the copies follow the weights after every step and after a resume; the config refuses what cannot work.
Its process group stays up for the later in-process trainer files (test_train.py ends it), as a group
ended under DeepSpeed leaves it a stale clone."""
import pytest
import torch

import kernels
from engine.config import ConfigError, from_dict, resolve_bf16_weight_copies, validate
from tests.engine.trainer_fixtures import tiny_config

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin_data")


@pytest.fixture(autouse=True)
def _keep_kernel_backend_and_autocast_flag(monkeypatch):
    from deepspeed.runtime import torch_autocast

    # DeepSpeed marks its autocast set up process-wide; later engines in this process must not see it
    monkeypatch.setattr(torch_autocast, "TORCH_AUTOCAST_INITIALIZED", False)
    monkeypatch.setattr(torch_autocast, "TORCH_AUTOCAST_DTYPE", None)
    # a ZeRO-3 engine built earlier in this process (test_resume.py) leaves DeepSpeed's own
    # torch.nn.functional.linear in place ("this will persist unless manually reset"), which adds an fp32
    # bias to the bf16 matmul itself where autocast would have cast it: torch's linear for these runs
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)
    with kernels.use_backend(kernels.get_backend()):
        yield


def config(run_dir, data_root, copies, **train):
    return tiny_config(run_dir, data_root, train={"precision": "bf16-mixed", "bf16_weight_copies": copies,
                                                  "max_steps": 4, **train})


def make_trainer(run_dir, data_root, copies, optim=None, **train):
    from engine.trainer import Trainer

    raw = config(run_dir, data_root, copies, **train)
    raw["optim"].update(optim or {})
    return Trainer(from_dict(raw))


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}


def assert_same_metrics(a, b):
    # grad_norm is NaN where DeepSpeed keeps none (stage 0 without fused_clip): NaN counts as equal to NaN
    assert a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a), (a, b)


def assert_copies_fresh(trainer):
    copies = trainer.weight_copies
    assert copies is not None and len(copies.copies) > 0
    for param, copy in copies.mapping().items():
        assert torch.equal(copy, param.detach().to(BF16))


@pytest.mark.parametrize("stage, fused_clip", [(0, "false"), (0, "true"), (2, "false"), (2, "true")])
def test_steps_with_copies_are_the_steps_without(tmp_path, data_root, stage, fused_clip):
    # 2 micro-batches a step (global batch 8, micro-batch 4): the copies are written after the real step,
    # by ClippedAdamW itself without ZeRO (optim.fused_clip), else by the trainer after engine.step()
    runs = {}
    for copies in ("false", "true"):
        trainer = make_trainer(tmp_path / copies, data_root, copies, optim={"fused_clip": fused_clip},
                               zero_stage=stage)
        assert trainer.accum == 2 and trainer.engine.zero_optimization_stage() == stage
        assert (trainer.weight_copies is not None) == (copies == "true")
        assert trainer.copies_written_by_optimizer == (copies == "true" and stage == 0 and fused_clip == "true")
        start = weights(trainer)
        metrics = []
        for _ in range(3):
            metrics.append(trainer.train_step())
            if copies == "true":
                assert_copies_fresh(trainer)
        runs[copies] = metrics, weights(trainer)
        assert any(not torch.equal(start[k], v) for k, v in runs[copies][1].items())
        assert "weight_bf16" not in "".join(trainer.engine.module.state_dict())
    for with_copies, without in zip(*(runs[c][0] for c in ("true", "false"))):
        assert_same_metrics(with_copies, without)
    for name, value in runs["false"][1].items():
        assert torch.equal(runs["true"][1][name], value), name


def test_resume_refreshes_the_copies_and_continues_exactly(tmp_path, data_root):
    first = make_trainer(tmp_path / "run", data_root, "true")
    for _ in range(2):
        first.train_step()
    first.save()
    uninterrupted = first.train_step(), weights(first)
    resumed = make_trainer(tmp_path / "run", data_root, "true")  # checkpoint.resume: auto; the RNG state too
    assert resumed.step == 2
    initial = resumed.initial_state
    assert any(not torch.equal(initial[n], p.detach()) for n, p in resumed.engine.module.named_parameters())
    assert_copies_fresh(resumed)  # made from the initial weights, refreshed after the load
    assert_same_metrics(resumed.train_step(), uninterrupted[0])
    for name, value in uninterrupted[1].items():
        assert torch.equal(weights(resumed)[name], value), name
    assert_copies_fresh(resumed)


def test_auto_rule():
    cfg = from_dict(tiny_config("/tmp/unused", "/tmp/unused"))
    assert resolve_bf16_weight_copies(cfg, "cuda", "bf16-mixed", 2)
    assert resolve_bf16_weight_copies(cfg, "cuda", "bf16-mixed", 0)
    assert not resolve_bf16_weight_copies(cfg, "cuda", "bf16-mixed", 3)
    assert not resolve_bf16_weight_copies(cfg, "cpu", "bf16-mixed", 2)   # the CPU path stays as it was
    assert not resolve_bf16_weight_copies(cfg, "cuda", "bf16", 2)        # bf16 weights: nothing is cast
    cfg.train.bf16_weight_copies = "false"
    assert not resolve_bf16_weight_copies(cfg, "cuda", "bf16-mixed", 2)


@pytest.mark.parametrize("train, message", [
    (dict(zero_stage=3), r"train\.bf16_weight_copies: 'true': 'auto' or 'false' under ZeRO-3"),
    (dict(precision="fp32"), r"train\.bf16_weight_copies: 'true': 'auto' or 'false' with train\.precision 'fp32'"),
    (dict(precision="bf16"), r"train\.bf16_weight_copies: 'true': 'auto' or 'false' with train\.precision 'bf16'"),
])
def test_true_is_refused_where_it_cannot_work(tmp_path, data_root, train, message):
    cfg = from_dict(config(tmp_path / "run", data_root, "true", **train))
    with pytest.raises(ConfigError, match=message) as error:
        validate(cfg, world_size=1, cuda_available=False, disk=False)
    assert "\n" not in str(error.value)


GRADS_RUN = dict(zero_stage=0, global_batch_size=4)  # one micro-batch a step, one rank, ZeRO-0
GRADS_OPTIM = {"fused_clip": "true", "step_kernel": "alignflow", "grad_clip": 0.05}  # clipped steps


def test_bf16_weight_grads_take_the_cast_paths_steps(tmp_path, data_root):
    # train.bf16_weight_grads: the copies take the matmuls' gradients in bf16 (no fp32 .grad for the weights
    # they stand for) and the AlignFlow AdamW step reads them (here kernels.reference_adamw_step, the
    # kernel's specification): the same losses, norms and weights as casting them to fp32, bit for bit
    runs = {}
    for grads in ("false", "true"):
        trainer = make_trainer(tmp_path / grads, data_root, "true", optim=GRADS_OPTIM, bf16_weight_grads=grads,
                               **GRADS_RUN)
        copies = trainer.weight_copies
        assert trainer.accum == 1 and copies.grads == (grads == "true")
        seen = []

        def after_backward(phase):
            if phase == "backward":
                supplied = copies.gradients()
                seen.append((len(supplied), sum(p.grad is not None for p in supplied)))

        metrics = [trainer.train_step(mark=after_backward) for _ in range(3)]
        assert copies.gradients() == {}
        if grads == "true":  # every Linear/Conv weight's gradient came from its copy, none into .grad
            linears = [m for m in trainer.engine.module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            assert all(n >= len(linears) and both == 0 for n, both in seen), seen
        else:
            assert seen == [(0, 0)] * 3
        assert_copies_fresh(trainer)
        runs[grads] = metrics, weights(trainer)
    for a, b in zip(*(runs[g][0] for g in ("true", "false"))):
        assert_same_metrics(a, b)
    assert runs["true"][0][0]["grad_norm"] > 0.05  # the steps were clipped
    for name, value in runs["false"][1].items():
        assert torch.equal(runs["true"][1][name], value), name


def test_bf16_weight_grads_auto_rule():
    from engine.config import resolve_bf16_weight_grads

    cfg = from_dict(tiny_config("/tmp/unused", "/tmp/unused"))
    cfg.optim.step_kernel = "alignflow"
    assert resolve_bf16_weight_grads(cfg, "cuda", "bf16-mixed", 0, 1, 1)
    assert not resolve_bf16_weight_grads(cfg, "cuda", "bf16-mixed", 2, 1, 1)  # ZeRO's hooks read .grad
    assert not resolve_bf16_weight_grads(cfg, "cuda", "bf16-mixed", 0, 2, 1)  # the all-reduce reads .grad
    assert not resolve_bf16_weight_grads(cfg, "cuda", "bf16-mixed", 0, 1, 2)  # accumulation would round
    assert not resolve_bf16_weight_grads(cfg, "cpu", "bf16-mixed", 0, 1, 1)   # no copies on the CPU by auto
    cfg.optim.step_kernel = "torch"
    assert not resolve_bf16_weight_grads(cfg, "cuda", "bf16-mixed", 0, 1, 1)


@pytest.mark.parametrize("train, optim, message", [
    (dict(zero_stage=2), GRADS_OPTIM, r"with ZeRO stage 2 \(its gradient hooks"),
    (dict(zero_stage=0), GRADS_OPTIM, r"with 2 micro-batches a step"),
    (GRADS_RUN, {"fused_clip": "true"}, r"with optim\.step_kernel 'torch'"),
    (dict(GRADS_RUN, bf16_weight_copies="false"), GRADS_OPTIM, r"with train\.bf16_weight_copies off"),
])
def test_bf16_weight_grads_true_is_refused_where_it_cannot_work(tmp_path, data_root, train, optim, message):
    raw = config(tmp_path / "run", data_root, "true", bf16_weight_grads="true", **train)
    raw["optim"].update(optim)
    with pytest.raises(ConfigError, match=r"train\.bf16_weight_grads: 'true': 'auto' or 'false' " + message) as error:
        validate(from_dict(raw), world_size=1, cuda_available=False, disk=False)
    assert "\n" not in str(error.value)
