"""bench.model's stand-in for DeepSpeed's ZeRO-2 optimizer (bench.model._ZeroOptimizer, the trainer-* rows)
and for its engine without ZeRO (bench.model._StageZeroEngine, trainer-bf16-mixed-zero0) against DeepSpeed itself: the real Trainer (one CPU rank, DeepSpeed's CPU accelerator, gloo) takes one
step under bench.model's Tracer, and the ops that DeepSpeed's ZeRO optimizer, torch's fused AdamW (through
engine.optim.ClippedAdamW) and the trainer's EMA run in the backward and in the step must be, op for op,
the ones the stand-in runs for the same parameters: the same aten op, phase, bytes read and written.
At stage 0 the same for DeepSpeed's engine (its step and, where the trainer does not skip it, its gradient
all-reduce), ClippedAdamW with the bf16 weight copies and the EMA over the fp32 parameters.
On two CPU ranks, the collectives and the sharding that the ZeRO projection assumes.

Exceptions (stated, not compared):
  - collectives (gloo here, NCCL on a GPU): at world size 1 they move nothing on a GPU; the ZeRO projection
    (bench.model.zero_projection) models them for more GPUs;
  - DeepSpeed's scaling of the loss by its loss scale and by the accumulation steps (scalar ops before the
    backward).
What the CPU run cannot show and the stand-in assumes as on a GPU: overlap_comm (the trainer turns it off on
the CPU) changes which stream reduces, not the ops; norms in fp64 as on CUDA (DeepSpeed's get_norm_dtype)."""
import collections
import importlib.util
import json
import os
import sys

import pytest
import torch

import bench.model as bm
from engine.config import from_dict
from tests.engine.trainer_fixtures import in_process_trainers, tiny_config

COLLECTIVES = {"allreduce_", "allgather_", "_allgather_base_", "allgather_into_tensor_coalesced_", "reduce_scatter_",
               "_reduce_scatter_base_", "broadcast_", "barrier", "reduce_"}
# found, not imported: the trainer picks DeepSpeed's accelerator before deepspeed is first imported
_DEEPSPEED = os.path.dirname(os.path.dirname(os.path.abspath(importlib.util.find_spec("deepspeed").origin)))
OWNERS = (os.path.join(_DEEPSPEED, "deepspeed", "runtime", "zero") + os.sep,
          os.path.join(_DEEPSPEED, "deepspeed", "runtime", "utils.py"),
          os.path.join(_DEEPSPEED, "deepspeed", "runtime", "base_optimizer.py"),
          os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine", "ema.py"),
          os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine", "optim.py"))
# DeepSpeed's engine: the functions of its step and of its gradient all-reduce (stage 0 runs them itself)
ENGINE = os.path.join(_DEEPSPEED, "deepspeed", "runtime", "engine.py")
ENGINE_OWNED = {"_take_model_step", "zero_grad", "allreduce_gradients", "buffered_allreduce_fallback",
                "_get_gradients_for_reduction", "_reduce_non_expert_gradients", "allreduce_no_retain",
                "allreduce_and_copy", "allreduce_bucket"}
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _owner_is_the_optimizer() -> bool:
    """Whether the innermost frame outside torch (and this recorder) is DeepSpeed's ZeRO optimizer, its
    helpers, its engine's step or gradient all-reduce, engine.optim or engine.ema."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH) and path != bm.__file__ and path != __file__:
            return path.startswith(OWNERS) or (path == ENGINE and frame.f_code.co_name in ENGINE_OWNED)
        frame = frame.f_back
    return False


class OwnedTracer(bm.Tracer):
    """bench.model's Tracer that marks each op with whether the optimizer's code ran it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        count = len(self.ops)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        owned = _owner_is_the_optimizer()
        for op in self.ops[count:]:
            op.fused_region = owned  # reused as the mark: nothing in this test reads it otherwise
        return out


def _signature(ops) -> collections.Counter:
    return collections.Counter((op.step_phase, op.name, op.read, op.written, op.launches) for op in ops
                               if op.name not in COLLECTIVES)


@pytest.fixture(scope="module", autouse=True)
def _single_rank_process_group():
    with in_process_trainers():
        yield


def deepspeed_step_ops(tmp_path, precision: str, check_overflow: bool, monkeypatch):
    """The real trainer (ZeRO-2, optim.fused_clip as on a GPU, one micro-batch a step): the ops of its
    second step that the optimizer runs."""
    from deepspeed.runtime import torch_autocast

    from engine.trainer import Trainer

    # DeepSpeed marks its autocast set up process-wide; no engine before or after this one may inherit it
    monkeypatch.setattr(torch_autocast, "TORCH_AUTOCAST_INITIALIZED", False)
    monkeypatch.setattr(torch_autocast, "TORCH_AUTOCAST_DTYPE", None)
    with open(bm.TRAINER_DEEPSPEED_JSON) as f:
        ds = json.load(f)
    ds["bf16"] = dict(ds.get("bf16", {}), check_grad_overflow=check_overflow)
    (tmp_path / "zero2.json").write_text(json.dumps(ds))
    raw = tiny_config(tmp_path / "run", tmp_path / "data",
                      train={"precision": precision, "global_batch_size": 4, "max_steps": 2,
                             "deepspeed_config": str(tmp_path / "zero2.json")},
                      optim={"fused_clip": "true"})
    trainer = Trainer(from_dict(raw))
    assert type(trainer.engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
    assert trainer.engine.zero_optimization_stage() == 2
    ops = traced_step(trainer)
    return trainer, [op for op in ops if op.fused_region]


def traced_step(trainer):
    """The ops of the trainer's second step (the first creates the optimizer state) in its backward and
    optimizer phases, each marked (fused_region) with whether the optimizer ran it."""
    assert trainer.fused_clip and trainer.accum == 1
    trainer.train_step()
    tracer = OwnedTracer()
    after = {"data": "encoder", "encoder": "forward", "forward": "backward", "backward": "optimizer",
             "optimizer": "done"}
    tracer.phase = "data"

    def mark(phase):
        tracer.phase = after[phase]

    with tracer:
        trainer.train_step(mark=mark)
    return [op for op in tracer.ops if op.step_phase in ("backward", "optimizer")]


def _standin_ops(params, optimizer, tracer):
    """A backward that makes every gradient of `params` (in reverse order, as a backward does), then
    `optimizer`'s step, twice (the first creates the AdamW state, unrecorded): the second's optimizer ops."""
    for step in range(2):
        tracer.recording = step == 1
        with tracer:
            tracer.phase = "backward"
            torch.autograd.backward(params[::-1], [torch.randn_like(p) for p in params[::-1]])
            tracer.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad()
    return [op for op in tracer.ops if op.category == "optimizer"]


def standin_step_ops(trainer, precision: str, check_overflow: bool):
    """bench.model's stand-in over parameters of the trainer's shapes and dtypes: a backward that makes
    every gradient (in reverse order, as a backward does), then its step; its optimizer ops."""
    from engine.optim import ClippedAdamW

    module = trainer.engine.module
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [torch.nn.Parameter(torch.randn(p.shape).to(p.dtype)) for _, p in named]
    reduced = {id(p) for p in bm._autocast_reduced(module)}
    comm_dtypes = ({q: torch.bfloat16 for (_, p), q in zip(named, params) if id(p) in reduced}
                   if precision == "bf16-mixed" else {})
    bucket = int(float(trainer.ds_config["zero_optimization"]["reduce_bucket_size"]))
    tracer = bm.Tracer()
    optimizer = bm._ZeroOptimizer(params, lambda p: ClippedAdamW(p, max_norm=1.0, lr=1e-4), ema=True,
                                  fused_clip=True, max_norm=1.0, comm_dtypes=comm_dtypes, bucket_elements=bucket,
                                  tracer=tracer, check_overflow=check_overflow)
    return _standin_ops(params, optimizer, tracer)


@pytest.mark.parametrize("precision, check_overflow", [("bf16", True), ("bf16", False), ("bf16-mixed", True)])
def test_zero_standin_runs_deepspeeds_ops(tmp_path, precision, check_overflow, monkeypatch):
    """bf16.check_grad_overflow false (what the trainer generates with optim.fused_clip) drops the overflow check's 4 bytes
    a parameter and 13 kernels a gradient, in DeepSpeed and in the stand-in alike."""
    trainer, real = deepspeed_step_ops(tmp_path, precision, check_overflow, monkeypatch)
    try:
        modelled = standin_step_ops(trainer, precision, check_overflow)
    finally:
        trainer.engine.destroy()
    params = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
    assert_same_ops(real, modelled, precision)
    # the figure that matters, per parameter: the optimizer's bytes in the backward and in the step
    per_param = {phase: sum(op.bytes for op in real if op.step_phase == phase) / params
                 for phase in ("backward", "optimizer")}
    expected = {"bf16": {"backward": 12.0, "optimizer": 82.0 if check_overflow else 78.0},
                "bf16-mixed": {"backward": None, "optimizer": 80.0}}[precision]
    assert per_param["optimizer"] == pytest.approx(expected["optimizer"], abs=0.5), per_param
    if expected["backward"] is not None:
        assert per_param["backward"] == pytest.approx(expected["backward"], abs=0.5), per_param


def assert_same_ops(real, modelled, what: str):
    real_sig, modelled_sig = _signature(real), _signature(modelled)
    only_real, only_modelled = real_sig - modelled_sig, modelled_sig - real_sig
    assert not only_real and not only_modelled, (
        f"{what}: ops (phase, op, read, written, launches) x calls that DeepSpeed runs and the stand-in "
        f"does not: {sorted(only_real.items())[:12]}; the stand-in's extra: {sorted(only_modelled.items())[:12]}")


def stage_zero_step_ops(tmp_path, skip_allreduce: bool, monkeypatch):
    """The real trainer without ZeRO as on one GPU (bf16-mixed, train.zero_stage 0, optim.fused_clip, the bf16
    weight copies), with its skip of DeepSpeed's gradient all-reduce or without: the ops of its second step
    that DeepSpeed's engine, the optimizer and the EMA run."""
    from deepspeed.runtime import torch_autocast

    from engine.trainer import Trainer

    monkeypatch.setattr(torch_autocast, "TORCH_AUTOCAST_INITIALIZED", False)
    monkeypatch.setattr(torch_autocast, "TORCH_AUTOCAST_DTYPE", None)
    if not skip_allreduce:
        monkeypatch.setattr(Trainer, "_skip_identity_allreduce", lambda self: None)
    raw = tiny_config(tmp_path / "run", tmp_path / "data",
                      train={"precision": "bf16-mixed", "zero_stage": 0, "global_batch_size": 4, "max_steps": 2,
                             "bf16_weight_copies": "true"},  # its 'auto' on a GPU
                      optim={"fused_clip": "true"})
    trainer = Trainer(from_dict(raw))
    engine = trainer.engine
    assert engine.zero_optimization_stage() == 0 and engine.optimizer is trainer.clip_optimizer
    assert trainer.copies_written_by_optimizer and engine.enable_backward_allreduce is not skip_allreduce
    ops = traced_step(trainer)
    return trainer, [op for op in ops if op.fused_region]


def stage_zero_standin_ops(trainer, allreduce: bool):
    """bench.model's stand-in (_StageZeroEngine over ClippedAdamW writing the bf16 copies of the trainer's
    copied weights) over parameters of the trainer's shapes: its optimizer ops."""
    from engine.optim import ClippedAdamW

    real = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    params = [torch.nn.Parameter(torch.randn(p.shape)) for p in real]
    copied = {id(p) for p in trainer.weight_copies.mapping()}
    optimizer = ClippedAdamW(params, max_norm=1.0, lr=1e-4)
    optimizer.set_bf16_copies({q: torch.empty(q.shape, dtype=torch.bfloat16)
                               for p, q in zip(real, params) if id(p) in copied})
    tracer = bm.Tracer()
    engine = bm._StageZeroEngine(params, optimizer, ema=True, allreduce=allreduce, tracer=tracer)
    return _standin_ops(params, engine, tracer)


@pytest.mark.parametrize("skip_allreduce", [True, False])
def test_stage_zero_standin_runs_the_trainers_ops(tmp_path, skip_allreduce, monkeypatch):
    """trainer-bf16-mixed-zero0: per parameter, the step's norm (4 bytes), fused AdamW with the clip divisor
    (16 read, 16 written), the EMA lerp over the fp32 parameters (8 read, 4 written) and the bf16 copies
    (4 read, 2 written a copied weight); in the backward nothing, or without the trainer's skip DeepSpeed's
    flatten into buckets and copy back (16)."""
    trainer, real = stage_zero_step_ops(tmp_path, skip_allreduce, monkeypatch)
    try:
        modelled = stage_zero_standin_ops(trainer, allreduce=not skip_allreduce)
        params = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
        copied = trainer.weight_copies.numel()
    finally:
        trainer.engine.destroy()
    assert_same_ops(real, modelled, f"stage 0, all-reduce {'skipped' if skip_allreduce else 'run'}")
    per_param = {phase: sum(op.bytes for op in real if op.step_phase == phase) / params
                 for phase in ("backward", "optimizer")}
    assert 0 < copied < params
    assert per_param["optimizer"] == pytest.approx(4 + 32 + 12 + 6 * copied / params, abs=0.05), per_param
    assert per_param["backward"] == pytest.approx(0.0 if skip_allreduce else 16.0, abs=0.05), per_param


def test_two_ranks_all_reduce_whole_buckets_and_shard_the_step(tmp_path):
    """The ZeRO projection's assumptions (bench.model.zero_projection) on two CPU ranks, bf16: every rank
    copies and divides its whole gradient into the buckets (2 + 2 bytes a parameter each), concatenates
    the bucket slices (2 + 2) and all-reduces the whole bf16 gradient (DeepSpeed's default
    use_multi_rank_bucket_allreduce: not a reduce-scatter); the step's passes run over the rank's
    partition (fused AdamW's 16 bytes a parameter read split between the ranks), then the bf16
    parameters are all-gathered."""
    from tests.engine.trainer_fixtures import run_ranks

    outputs = run_ranks("tests.zero_ops_worker", ["--dir", str(tmp_path)], world_size=2, timeout=240)
    ranks = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
             if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in ranks) == [0, 1], outputs
    params = ranks[0]["params"]
    for r in ranks:
        assert r["world"] == 2 and r["accum"] == 1
        b = r["bytes"]
        assert b["backward allreduce_"] == [2 * params, 2 * params], (r["rank"], b)  # the whole bf16 gradient
        assert b["backward div_"] == [2 * params, 2 * params] and b["backward cat"] == [2 * params, 2 * params]
        assert "optimizer _allgather_base_" in b and "optimizer reduce_scatter_" not in b
        assert "backward reduce_scatter_" not in b and "backward _reduce_scatter_base_" not in b
    adam = [r["bytes"]["optimizer _fused_adamw_"][0] for r in ranks]
    assert sum(adam) == pytest.approx(16 * params, rel=0.01) and max(adam) < 0.75 * 16 * params  # sharded
