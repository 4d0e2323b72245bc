"""bench.model's host lane: the calls it counts on small traces against hand counts, the compiled and
CUDA-graph replacements, the phase as the longer of the two lanes, and the fit of the host costs (on
made-up rows with known costs, and on the stored H200 measurement, whose answer HOST_COSTS must be)."""
import importlib
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels

model = importlib.import_module("bench.model")

SMALL = dict(model="SiT-S/2", batch=2, resolution=256, encoder="dinov2-vit-s",
             model_overrides=dict(hidden_size=64, depth=2, num_heads=2))


def _trace_with_backward(forward, in_model):
    """The tracer after `forward()` (on fake tensors made inside it; returns the tensor to backprop) and
    its backward (a scalar's, or from a gradient drawn outside the model), phased as trace_step phases
    the step."""
    tracer = model.Tracer()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with tracer, tracer.intercept_triton():
            tracer.phase, tracer.in_model = "forward", in_model
            out = forward()
            tracer.in_model = False
            grad = torch.randn_like(out) if out.dim() else None
            tracer.tag_forward_outputs()
            tracer.phase = "backward"
            out.backward(grad)
    return tracer


def _nonzero(counts):
    return {sp: {k: n for k, n in c.items() if n} for sp, c in counts.items()}


def test_host_calls_of_a_small_graph_counted_by_hand():
    """relu(x @ w).sum(), eager. Forward: x and w drawn (2 randn kernels), mm, relu, sum: 5 aten ops that
    launch, nothing else (a leaf's detach is autograd's bookkeeping). Backward: the seed (ones_like);
    SumBackward expands the seed (a view), ReluBackward runs threshold_backward, MmBackward two mm on two
    transposes (views): 4 aten ops, 3 views; nodes: Sum, Relu, Mm and x's and w's AccumulateGrad."""
    def forward():
        x = torch.randn(8, 16, requires_grad=True)
        w = torch.randn(16, 12, requires_grad=True)
        return torch.relu(x @ w).sum()

    tracer = _trace_with_backward(forward, in_model=False)
    counts = model.count_host(tracer.host, tracer.ops)
    assert _nonzero(counts) == {"encoder": {}, "forward": {"aten": 5},
                                "backward": {"aten": 4, "aten_view": 3, "autograd_node": 5}, "optimizer": {}}
    nodes = sorted(c.name for c in tracer.host if c.kind == "autograd_node")
    assert nodes == ["MmBackward0", "ReluBackward0", "SumBackward0"] + ["torch::autograd::AccumulateGrad"] * 2
    costs = dict.fromkeys(model.HOST_KINDS, 1.0)
    costs.update(aten=10e-6, aten_view=2e-6, autograd_node=1e-6)
    host = model.host_seconds(counts, costs)
    assert host["forward"] == pytest.approx(50e-6) and host["backward"] == pytest.approx(40e-6 + 6e-6 + 5e-6)
    assert host["encoder"] == host["optimizer"] == 0.0


def _adaln_forward():
    x = torch.randn(2, 16, 72, dtype=torch.bfloat16, requires_grad=True)
    shift, scale = (torch.randn(2, 72, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    with kernels.use_backend("triton"):
        return kernels.adaln_modulate(x, shift, scale)


def test_a_kernels_op_is_one_call_forward_and_one_backward_and_compiled_regions_replace_the_rest():
    """kernels.adaln_modulate inside the model, eager: one kernels_op call forward (its FusedOp) and one
    backward (its autograd.Function's node), besides the aten ops around and inside it: forward the 3
    input draws and the gradient's (outside the model), 3 output allocations and 2 views in the launcher;
    backward 2 scratch allocations and a view, the partial-sum reduction (sum, then 2 selects of it) and
    the 2 gradient casts; nodes: its own and 3 AccumulateGrad. Compiled (SiT's region): the region's aten
    ops and nodes go, AccumulateGrad stays (eager after a compiled backward), the kernels op stays (its
    custom op's launcher runs), its Triton launches are not Inductor's, and each Inductor kernel of the
    region is one launch: forward the 3 draws (one kernel), backward the reduction and casts (one kernel);
    the gradient's draw, outside the region, stays an aten op. CUDA graphs: one replay per region
    instead, the kernels op captured with it."""
    tracer = _trace_with_backward(_adaln_forward, in_model=True)
    eager = _nonzero(model.count_host(tracer.host, tracer.ops))
    assert eager["forward"] == {"aten": 4, "aten_view": 5, "kernels_op": 1}
    assert eager["backward"] == {"aten": 3, "aten_view": 5, "kernels_op": 1, "autograd_node": 4}
    assert [c.name for c in tracer.host if c.kind == "kernels_op"] == ["alignflow::adaln_modulate",
                                                                       "AdalnModulateBackward"]
    fused = model.fuse_compiled(tracer.ops)
    compiled = _nonzero(model.count_host(tracer.host, fused, compiled=True))
    assert compiled["forward"] == {"aten": 1, "kernels_op": 1, "inductor_launch": 1}
    assert compiled["backward"] == {"kernels_op": 1, "autograd_node": 3, "inductor_launch": 1}
    graphs = _nonzero(model.count_host(tracer.host, model.capture_graphs(fused), compiled=True))
    assert graphs["forward"] == {"aten": 1, "graph_replay": 1}
    assert graphs["backward"] == {"autograd_node": 3, "graph_replay": 1}


def test_the_trainer_backward_runs_one_deepspeed_hook_per_trained_parameter():
    """Each gradient the backward makes (one AccumulateGrad node each) fires one DeepSpeed hook; the
    frozen pos_embed has neither. The hooks' bucket copies (one a gradient, phase backward) and the
    epilogue's copies into the partition (one a gradient, phase optimizer) are aten ops of the backward."""
    trace = model.trace_step(backend="triton", trainer=True, fused_clip=True, **dict(SMALL, precision="bf16"))
    calls = Counter((c.kind, c.name) for c in trace["host"] if c.step_phase == "backward")
    hooks = calls[("zero_hook", "DeepSpeed gradient hook")]
    assert hooks == calls[("autograd_node", "torch::autograd::AccumulateGrad")] > 0
    copies = Counter(op.phase for op in trace["ops"] if op.step_phase == "backward" and op.category == "optimizer"
                     and op.name == "copy_")
    assert copies == {"backward": hooks, "optimizer": hooks}
    counts = model.count_host(trace["host"], trace["ops"])
    assert counts["backward"]["zero_hook"] == hooks and counts["forward"]["zero_hook"] == 0


def test_each_phase_takes_the_longer_lane():
    """Hand-made ops and counts: the forward's device lane 1 ms against 10 aten calls at 30 us (0.3 ms): the
    device bounds it; the backward's 0.2 ms against 2 kernels_op calls at 0.5 ms: the host (1 ms) does. The
    step is the sum of the longer lanes; the device lane and its categories stay as they were."""
    def op(step_phase, nbytes):
        return model.Op("k", step_phase, "pointwise", read=nbytes, launches=0, step_phase=step_phase)

    ops = [op("forward", 1e9), op("backward", 0.2e9)]
    ceilings = {"bandwidth": 1e12, "bf16": 1e15, "tf32": 5e14, "attention_efficiency": 0.6, "peak_bf16": 1e15}
    counts = {sp: dict.fromkeys(model.HOST_KINDS, 0) for sp in model.STEP_PHASES}
    counts["forward"]["aten"], counts["backward"]["kernels_op"] = 10, 2
    costs = dict.fromkeys(model.HOST_KINDS, 0.0)
    costs.update(aten=30e-6, kernels_op=0.5e-3)
    phases, bound = model.compose_phases({"forward": 1e-3, "backward": 0.2e-3}, {"forward": 0.3e-3, "backward": 1e-3})
    assert phases == {"encoder": 0.0, "forward": 1e-3, "backward": 1e-3, "optimizer": 0.0}
    assert bound == {"encoder": "device", "forward": "device", "backward": "host", "optimizer": "device"}
    summary = model.summarize(ops, ceilings, batch=4, model_flops=1.0, host_counts=counts, host_costs=costs)
    assert summary["device_step_s"] == pytest.approx(1.2e-3) and summary["step_s"] == pytest.approx(2e-3)
    assert summary["host_seconds"]["forward"] == pytest.approx(0.3e-3) and summary["bound_by"] == bound
    assert summary["phase_seconds"]["backward"] == pytest.approx(1e-3)
    assert summary["img_per_s"] == pytest.approx(4 / 2e-3)
    assert sum(summary["categories"].values()) == pytest.approx(summary["device_step_s"])
    assert model.summarize(ops, ceilings, batch=4, model_flops=1.0)["step_s"] == pytest.approx(1.2e-3)  # no lane


def test_the_fit_recovers_known_costs_from_host_bound_phases():
    """Made-up rows (fresh random counts): measured = the longer of a device lane and the counts at known
    costs (HOST_PRIORS' kinds at their priors). The fit recovers every fitted cost; a device-bound row
    (its measurement its device lane) stays out of it, as does one above its device lane that the host
    lane cannot reach (only prior-costed calls), whose error is then the device lane's."""
    rng = np.random.default_rng()
    truth = {"aten": 20e-6, "aten_view": 4e-6, "kernels_op": 120e-6, "autograd_node": 3e-6, "zero_hook": 40e-6,
             "inductor_launch": 15e-6, **{k: v for k, (v, _) in model.HOST_PRIORS.items()}}
    rows = []
    for i in range(12):
        counts = {k: int(rng.integers(0, 2000)) for k in ("aten", "aten_view", "autograd_node")}
        counts.update(kernels_op=int(rng.integers(0, 200)), zero_hook=int(rng.integers(0, 400)) * (i % 3 == 0),
                      inductor_launch=int(rng.integers(0, 600)) * (i % 4 == 1), multi_tensor=int(rng.integers(0, 5)))
        host = sum(n * truth[k] for k, n in counts.items())
        rows.append({"variant": f"v{i}", "phase": "forward", "measured_s": host,
                     "device_s": host * rng.uniform(0.2, 0.8), "counts": counts})
    rows.append({"variant": "device-bound", "phase": "forward", "measured_s": 0.05, "device_s": 0.05,
                 "counts": {"aten": 10}})
    rows.append({"variant": "unreachable", "phase": "optimizer", "measured_s": 0.01, "device_s": 0.007,
                 "counts": {"multi_tensor": 4}})
    fit = model.fit_host_costs(rows)
    assert set(fit["fitted"]) == set(truth) - set(model.HOST_PRIORS)
    for kind, cost in truth.items():
        assert fit["costs"][kind] == pytest.approx(cost, rel=1e-6), kind
    by_name = {r["variant"]: r for r in fit["rows"]}
    assert not by_name["device-bound"]["in_fit"] and not by_name["unreachable"]["in_fit"]
    assert all(by_name[f"v{i}"]["in_fit"] and abs(by_name[f"v{i}"]["error"]) < 1e-6 for i in range(12))
    assert by_name["unreachable"]["error"] == pytest.approx(-0.3) == by_name["unreachable"]["device_error"]


def test_host_costs_are_the_fit_to_the_stored_h200_measurement():
    """HOST_COSTS are what fit_host_costs gives (to 0.01 us, the constants' precision) for the stored H200
    step (train_step-NVIDIA-H200-2026-12-04.json) with the host counts of the model's result beside it;
    with them the model's phases are closer to the measurement than the device lane alone was."""
    fit, step, prediction = model.host_fit_from("bench/results")
    assert step["_path"].endswith("train_step-NVIDIA-H200-2026-12-04.json")
    assert model.HOST_COSTS_SOURCE == f"fitted to {step['_path'].rsplit('/', 1)[-1]}"
    assert prediction["host_costs"] == model.HOST_COSTS
    for kind, cost in fit["costs"].items():
        assert model.HOST_COSTS[kind] == pytest.approx(cost, abs=0.005e-6), kind
    assert set(model.HOST_KINDS) - set(fit["fitted"]) == set(model.HOST_PRIORS)
    rms = lambda errors: math.sqrt(sum(e * e for e in errors) / len(errors))  # noqa: E731
    assert rms([r["error"] for r in fit["rows"]]) < 0.5 * rms([r["device_error"] for r in fit["rows"]])
    assert len(fit["rows"]) == 4 * sum("seconds_per_step" in r for r in step["variants"])


def test_the_report_compares_each_measured_phase_with_the_longer_lane():
    """bench.report's error table on a two-lane prediction (made-up numbers): each phase's error against
    phase_seconds with the lane that bounds it, the step's error without the host lane beside it, the
    fit's provenance and the RMS of the errors."""
    report = importlib.import_module("bench.report")
    breakdown = dict(data=0.001, encoder=0.005, forward=0.020, backward=0.030, optimizer=0.005, step=0.061)
    step = {"model": "SiT-XL/2", "batch": 32, "resolution": 256,
            "variants": [{"variant": "alignflow", "seconds_per_step": 0.061, "breakdown_seconds": breakdown}]}
    phases = dict(encoder=0.005, forward=0.022, backward=0.027, optimizer=0.006)  # step 0.060 vs 0.060
    prediction = {"config": {"model": "SiT-XL/2", "batch": 32, "resolution": 256},
                  "device": {"device": "H200 SXM"}, "host_costs_source": model.HOST_COSTS_SOURCE,
                  "variants": {"alignflow": {"step_s": 0.060, "device_step_s": 0.030, "phase_seconds": phases,
                                             "bound_by": dict(encoder="device", forward="host", backward="host",
                                                              optimizer="device")}}}
    printed = report.model_error_table(step, prediction)
    row = "| alignflow | 60.0 | 60.0 | +0% | -50% ! | +0% (device) | +10% (host) | -10% (host) | +20% (device) |"
    assert row in printed
    assert f"The host lane's costs were {model.HOST_COSTS_SOURCE}: so the errors here are that fit's residual" in printed
    rms = math.sqrt((0.0 + 0.01 + 0.01 + 0.04) / 5)
    assert f"RMS of the errors above (steps and phases): {100 * rms:.1f}%." in printed
