"""bench.model, the training-step cost model: its counts against hand-computed values and the analytic
FLOP counts, Inductor's modelled fusion, the ZeRO volumes, and the regression guard on the fused step's
bytes and launches at SiT-XL/2, batch 32."""
import importlib
import json
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels

model = importlib.import_module("bench.model")

SMALL = dict(model="SiT-S/2", batch=2, resolution=256, encoder="dinov2-vit-s",
             model_overrides=dict(hidden_size=64, depth=2, num_heads=2))


def _trace(fn, in_model=True):
    """The ops `fn` runs on fake tensors (made inside it), recorded as the model's forward."""
    tracer = model.Tracer()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with tracer, tracer.intercept_triton():
            tracer.phase, tracer.in_model = "forward", in_model
            fn()
    return tracer.ops


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_traced_flops_match_the_analytic_counts(backend):
    """The FLOPs counted op by op over the whole traced step are within 2% of SiT.flops_per_sample x 3
    plus bench/flops.py's encoder forward; the encoder's part alone matches bench/flops.py."""
    trace = model.trace_step(backend=backend, **SMALL)
    ops, batch = trace["ops"], SMALL["batch"]
    encoder = sum(op.model_flops for op in ops if op.phase == "encoder")
    assert encoder == pytest.approx(batch * trace["encoder_flops_per_image"], rel=0.02)
    forward = sum(op.model_flops for op in ops if op.phase == "forward")
    assert forward == pytest.approx(batch * trace["sit_flops_per_sample"], rel=0.02)
    assert sum(op.model_flops for op in ops) == pytest.approx(trace["model_flops"], rel=0.02)
    names = {op.name for op in ops}
    if backend == "triton":
        assert {"triton:_adaln_fwd_kernel", "triton:_adaln_bwd_kernel", "triton:_attn_fwd_kernel",
                "triton:_attn_bwd_dkdv_kernel", "triton:_attn_bwd_dq_kernel"} <= names
    else:
        assert not any(n.startswith("triton:") for n in names)
    assert {op.phase for op in ops} == {"encoder", "forward", "loss", "backward", "optimizer"}
    assert "_fused_adamw_" in names and "_foreach_norm" in names  # the CUDA multi-tensor paths


def test_fused_encoder_casts_no_weights_and_attends_on_the_kernel():
    """The alignflow trace runs the fused encoder (weights cast to bf16 once, before the step; attention
    on the Triton kernel, one launch per block) and the reference trace REPA's path (every Linear/Conv
    weight and bias cast by autocast on each call, SDPA); only the fused encoder's ops are marked for
    the compiled variants' Inductor fusion."""
    traces = {backend: model.trace_step(backend=backend, **SMALL)["ops"] for backend in ("torch", "triton")}
    encoder = {b: [op for op in ops if op.phase == "encoder"] for b, ops in traces.items()}
    blocks = 12  # dinov2-vit-s
    names = {b: [op.name for op in ops] for b, ops in encoder.items()}
    assert names["triton"].count("triton:_attn_fwd_kernel") == blocks and not set(names["triton"]) & model._SDPA
    assert sum(n in model._SDPA for n in names["torch"]) == blocks and "triton:_attn_fwd_kernel" not in names["torch"]
    linears = 4 * blocks + 1  # qkv, proj, fc1, fc2 per block, the patch embedding
    casts = {b: n.count("_to_copy") for b, n in names.items()}
    assert casts["torch"] - casts["triton"] >= 2 * linears  # a weight and a bias each
    assert sum(op.bytes for op in encoder["triton"]) < sum(op.bytes for op in encoder["torch"])
    assert all(op.compiled for op in encoder["triton"]) and not any(op.compiled for op in encoder["torch"])


def test_one_linear_counted_by_hand():
    M, K, N = 6, 40, 24

    def run():
        x = torch.empty(M, K, dtype=torch.bfloat16)
        w = torch.empty(N, K, dtype=torch.bfloat16)
        b = torch.empty(N, dtype=torch.bfloat16)
        torch.nn.functional.linear(x, w, b)

    ops = _trace(run)
    assert [op.name for op in ops] == ["addmm"]  # the transpose is a view: no kernel
    op = ops[0]
    assert op.flops == op.model_flops == 2 * M * K * N
    assert op.read == 2 * (M * K + N * K + N) and op.written == 2 * M * N
    assert op.launches == 1 and op.category == "matmul" and op.matmul_dtype == "bf16"


def test_fused_adaln_bytes_include_statistics_and_scratch():
    """adaln_residual_modulate: the forward launch reads x (fp32), h, gate, shift, scale (bf16) once and
    writes x_new, y and the fp32 mean/rstd; the backward launch also writes its fp32 partial sums
    (B, tiles, 3, D), which a separate reduction then reads."""
    B, N, D = 2, 16, 72
    adaln = importlib.import_module("kernels.adaln")

    def run():
        x = torch.randn(B, N, D, dtype=torch.float32, requires_grad=True)
        h = torch.randn(B, N, D, dtype=torch.bfloat16, requires_grad=True)
        gate, shift, scale = (torch.randn(B, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        with kernels.use_backend("triton"):
            x_new, y = kernels.adaln_residual_modulate(x, h, gate, shift, scale)
            torch.autograd.backward([x_new, y], [torch.randn_like(x_new), torch.randn_like(y)])

    ops = _trace(run)
    fwd = next(op for op in ops if op.name == "triton:_adaln_fwd_kernel")
    assert fwd.read == B * N * D * (4 + 2) + 3 * B * D * 2
    assert fwd.written == B * N * D * (4 + 2) + 2 * B * N * 4
    bwd = next(op for op in ops if op.name == "triton:_adaln_bwd_kernel")
    tiles, _ = adaln._backward_tiles(B, N, adaln._tile(N, D)[0])
    assert tiles == 1  # N = 16 rows are one row block
    reads = B * N * D * (4 + 2) + 2 * B * D * 2 + 2 * B * N * 4 + B * N * D * (2 + 4)  # x_new h gate scale stats dy g
    assert bwd.read == reads
    assert bwd.written == B * N * D * (4 + 2) + B * tiles * 3 * D * 4  # dx, dh, partial sums
    assert fwd.category == bwd.category == "norm/modulate" and fwd.fused_region and bwd.launches == 1
    sums = [op for op in ops if op.name == "sum" and op.fused_region]
    assert sums and sums[0].read == B * tiles * 3 * D * 4  # the partials, read back once


def test_linear_without_bias_on_tokens_is_one_matmul():
    """F.linear on (B, N, K) without a bias runs mm on the (B*N, K) view and folds the output back with
    _unsafe_view, which shares mm's storage: one launch, no copy."""
    B, N, K, M = 2, 6, 40, 24

    def run():
        torch.nn.functional.linear(torch.empty(B, N, K, dtype=torch.bfloat16), torch.empty(M, K, dtype=torch.bfloat16))

    ops = _trace(run)
    assert [op.name for op in ops] == ["mm"]
    assert ops[0].read == 2 * (B * N * K + M * K) and ops[0].written == 2 * B * N * M


def test_adaln_bias_gradient_comes_out_of_the_backward_counted_by_hand():
    """adaln_residual_modulate with the Linear's bias (model.fused_bias_grad): the forward also reads the
    bias; the backward's one launch writes a fourth row of fp32 partials (B, tiles, 4, D), summed over the
    tiles, then d_bias's row over the samples: two small reductions, none over the (B, N, D) dL/dh, whose
    bias sum nn.Linear's backward would run. Under SiT's autocast the bias is the fp32 parameter."""
    B, N, D = 2, 16, 72
    adaln = importlib.import_module("kernels.adaln")

    def run():
        x = torch.randn(B, N, D, dtype=torch.float32, requires_grad=True)
        h = torch.randn(B, N, D, dtype=torch.bfloat16, requires_grad=True)
        gate, shift, scale = (torch.randn(B, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        bias = torch.randn(D, dtype=torch.float32, requires_grad=True)
        with kernels.use_backend("triton"):
            x_new, y = kernels.adaln_residual_modulate(x, h, gate, shift, scale, bias=bias)
            torch.autograd.backward([x_new, y], [torch.randn_like(x_new), torch.randn_like(y)])

    ops = _trace(run)
    fwd = next(op for op in ops if op.name == "triton:_adaln_fwd_kernel")
    assert fwd.read == B * N * D * (4 + 2) + 3 * B * D * 2 + D * 4
    bwd = next(op for op in ops if op.name == "triton:_adaln_bwd_kernel")
    tiles, _ = adaln._backward_tiles(B, N, adaln._tile(N, D)[0])
    reads = B * N * D * (4 + 2) + 2 * B * D * 2 + D * 4 + 2 * B * N * 4 + B * N * D * (2 + 4)
    assert bwd.read == reads  # x_new h gate scale bias stats dy g_x_new
    assert bwd.written == B * N * D * (4 + 2) + B * tiles * 4 * D * 4  # dx, dh, partial sums
    sums = [op for op in ops if op.name == "sum"]
    assert [op.read for op in sums] == [B * tiles * 4 * D * 4, B * D * 4]


def test_alignflow_trace_hands_the_block_biases_to_the_adaln_kernel():
    """The Triton trace models a GPU run, where model.fused_bias_grad 'auto' is on: attn.proj and mlp.fc2
    run bias-free matmuls (mm, not addmm) and nn.Linear's backward sums of their (B, N, D) output
    gradient are gone, against the same trace with the switch off."""
    depth = SMALL["model_overrides"]["depth"]
    B, D = SMALL["batch"], SMALL["model_overrides"]["hidden_size"]
    counts = {}
    for switch in ("auto", False):
        overrides = dict(SMALL["model_overrides"], fused_bias_grad=switch)
        ops = model.trace_step(backend="triton", **dict(SMALL, model_overrides=overrides))["ops"]
        forward = [op.name for op in ops if op.phase == "forward"]
        bias_sums = [op for op in ops if op.phase == "backward" and op.name == "sum" and op.category == "reductions"
                     and op.read == B * 256 * D * 2]  # a bf16 (B, 256 tokens, D) gradient summed to (D,)
        counts[switch] = forward.count("mm"), forward.count("addmm"), len(bias_sums)
    assert counts["auto"][0] == counts[False][0] + 2 * depth
    assert counts["auto"][1] == counts[False][1] - 2 * depth
    assert counts[False][2] == 2 * depth and counts["auto"][2] == 0


def test_fused_gelu_backward_carries_the_bias_gradient_counted_by_hand():
    """SiT's fc1 + GELU with kernels.gelu_tanh: the backward's one launch reads the GELU input a and dL/dg
    (bf16) and writes dL/da plus its fp32 bias partial sums (tiles, N), which one small reduction reads;
    no full-size sum over dL/da remains. Under torch.compile the GELU forward inside the custom op is
    not Inductor's to fuse (an anchor)."""
    M, K, N = 64, 32, 300
    gelu = importlib.import_module("kernels.gelu")

    def run():
        x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(N, K, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(N, dtype=torch.bfloat16, requires_grad=True)
        with kernels.use_backend("triton"):
            g = kernels.gelu_tanh(torch.nn.functional.linear(x, w, b.detach()), b)
        g.backward(torch.randn_like(g))

    ops = _trace(run)
    (bwd,) = [op for op in ops if op.name == "triton:_gelu_bwd_kernel"]
    _, _, tiles, _ = gelu._tiles(M, N)
    assert tiles == 1  # M = 64 rows: one tile of 4 row blocks
    assert bwd.read == 2 * M * N * 2 and bwd.written == M * N * 2 + tiles * N * 4
    assert bwd.category == "pointwise" and bwd.fused_region and bwd.launches == 1
    sums = [op for op in ops if op.name == "sum"]
    assert [op.read for op in sums] == [tiles * N * 4]  # only the partials: nn.Linear's bias sum is gone
    assert [op.name for op in ops if op.name in ("addmm", "mm")] == ["addmm", "mm", "mm"]
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        compiled = _trace(run)
    (forward_gelu,) = [op for op in compiled if op.name == "gelu"]
    assert forward_gelu.anchor and forward_gelu.read == forward_gelu.written == M * N * 2


def test_mlp_kernel_matmuls_counted_by_hand():
    """kernels.mlp_gelu's two Triton matmuls carry their FLOPs (2 M N K, padded to the H100 tiles of
    kernels.linear_gelu.gpu_config; useful: unpadded) and bytes: the forward reads x, W1 and the bias
    and writes g and a; the backward reads dL/dy, W2 and a and writes dL/da and fc1's fp32 bias partials.
    No GELU pass and no dL/dg matmul through aten remain; fc2 and the weight gradients stay aten mm."""
    M, D, H = 200, 64, 300
    linear_gelu = importlib.import_module("kernels.linear_gelu")

    def run():
        x = torch.randn(M, D, dtype=torch.bfloat16, requires_grad=True)
        w1 = torch.randn(H, D, dtype=torch.bfloat16, requires_grad=True)
        b1 = torch.randn(H, dtype=torch.float32, requires_grad=True)
        w2 = torch.randn(D, H, dtype=torch.bfloat16, requires_grad=True)
        with kernels.use_backend("triton"):
            y = kernels.mlp_gelu(x, w1, b1, w2)
        y.backward(torch.randn_like(y))

    ops = _trace(run)
    fwd, bwd = (next(op for op in ops if op.name == f"triton:_linear_gelu_{k}_kernel") for k in ("fwd", "bwd"))
    bm, bn, bk = linear_gelu.gpu_config(9, torch.bfloat16, "fwd")[:3]
    assert fwd.flops == 2.0 * math.ceil(M / bm) * bm * math.ceil(H / bn) * bn * math.ceil(D / bk) * bk
    bm, bn, bk = linear_gelu.gpu_config(9, torch.bfloat16, "bwd")[:3]
    assert bwd.flops == 2.0 * math.ceil(M / bm) * bm * math.ceil(H / bn) * bn * math.ceil(D / bk) * bk
    assert fwd.model_flops == bwd.model_flops == 2.0 * M * D * H
    assert fwd.matmul_dtype == bwd.matmul_dtype == "bf16" and fwd.category == bwd.category == "matmul"
    assert fwd.read == (M * D + H * D) * 2 + H * 4 and fwd.written == 2 * M * H * 2
    tiles = math.ceil(M / 32)  # the trace runs the interpreter's 32-row tiles
    assert bwd.read == (M * D + D * H + M * H) * 2 and bwd.written == M * H * 2 + tiles * H * 4
    names = [op.name for op in ops]
    assert "gelu" not in names and "gelu_backward" not in names
    assert [n for n in names if n in ("addmm", "mm")] == ["mm", "mm", "mm", "mm"]  # fc2; dW2, dx, dW1
    assert sum(op.model_flops for op in ops) == pytest.approx(3 * 2 * (2.0 * M * D * H))


def test_attention_flops_with_head_dim_padding_and_recompute():
    """Our kernel at head dim 72 runs 64 + 16 = 80 wide GEMMs: 2 forward, 4 (dK, dV) + 3 (dQ) backward;
    PyTorch's flash SDPA (FlashAttention-2) pads 72 to 96 and runs 2.5x its forward backward."""
    B, N, H, d = 2, 256, 2, 72

    def ours():
        qkv = torch.randn(B, N, 3 * H * d, dtype=torch.bfloat16, requires_grad=True)
        with kernels.use_backend("triton"):
            kernels.attention_qkv(qkv, H).sum().backward()

    ops = {op.name: op for op in _trace(ours)}
    per_gemm, useful = 2.0 * B * H * N * N * 80, 2.0 * B * H * N * N * d
    assert ops["triton:_attn_fwd_kernel"].flops == 2 * per_gemm
    assert ops["triton:_attn_fwd_kernel"].model_flops == 2 * useful
    assert ops["triton:_attn_bwd_dkdv_kernel"].flops + ops["triton:_attn_bwd_dq_kernel"].flops == 7 * per_gemm
    assert ops["triton:_attn_bwd_dkdv_kernel"].model_flops + ops["triton:_attn_bwd_dq_kernel"].model_flops == 4 * useful
    assert ops["triton:_attn_fwd_kernel"].read == 3 * B * N * H * d * 2  # q, k, v read from the packed qkv once

    def sdpa():
        q, k, v = (torch.empty(B, H, N, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    flash = [op for op in _trace(sdpa) if op.category == "attention"]
    assert [op.flops for op in flash] == [4.0 * B * H * N * N * 96, 2.5 * 4.0 * B * H * N * N * 96]
    assert [op.model_flops for op in flash] == [2 * useful, 4 * useful]


def test_inductor_fusion_reads_external_inputs_and_writes_what_is_read_later():
    """Between two matmuls, relu(a @ w) * s + 1 is one kernel: it reads the matmul's output and s, and
    writes the result the next matmul reads; its intermediates never reach memory."""
    M, K = 64, 32

    def run():
        a, w, s = torch.empty(M, K), torch.empty(K, K), torch.empty(M, K)
        y = torch.relu(a @ w) * s + 1
        y @ w

    ops = _trace(run, in_model=True)
    assert [op.name for op in ops] == ["mm", "relu", "mul", "add", "mm"]
    eager = sum(op.bytes for op in ops[1:4])
    fused = model.fuse_compiled(ops)
    assert [op.name.split(":")[0] for op in fused] == ["mm", "inductor", "mm"]
    kernel = fused[1]
    assert kernel.read == 2 * M * K * 4 and kernel.written == M * K * 4 and kernel.launches == 1
    assert eager == 7 * M * K * 4  # relu 2, mul 3, add 2 tensors of M x K


def test_cuda_graphs_replay_compiled_regions_with_one_launch_each():
    """capture_graphs: each run of compiled ops of one step phase is one graph (its first kernel carries
    the graph's launch), its kernels cost GRAPH_NODE_S; eager ops in between keep their launch and end
    the run; bytes and FLOPs are untouched."""
    def op(phase, step_phase, compiled, launches=1):
        return model.Op("k", phase, "pointwise", read=1e6, launches=launches, compiled=compiled, step_phase=step_phase)

    ops = [op("encoder", "encoder", True), op("encoder", "encoder", True),         # graph 1
           op("forward", "forward", True), op("forward", "forward", True, 0),    # graph 2 (a view: no launch)
           op("forward", "forward", True), op("loss", "forward", False),         # the eager loss
           op("backward", "backward", True), op("backward", "backward", True),   # graph 3
           op("optimizer", "optimizer", False)]
    captured = model.capture_graphs(ops)
    assert [o.graph for o in captured] == [True] * 5 + [False] + [True] * 2 + [False]
    assert [o.graph_start for o in captured] == [True, False, True, False, False, False, True, False, False]
    ceilings = {"bandwidth": 1e12, "bf16": 1e15, "tf32": 5e14, "attention_efficiency": 0.6}
    seconds = [model.op_seconds(o, ceilings, launch_s=3e-6) for o in captured]
    assert seconds[0] == pytest.approx(1e-6 + 1e-6 + 3e-6) and seconds[1] == pytest.approx(1e-6 + 1e-6)
    assert seconds[3] == pytest.approx(1e-6) and seconds[5] == pytest.approx(1e-6 + 3e-6)
    assert [o.bytes for o in captured] == [o.bytes for o in ops]
    summary = model.summarize(captured, dict(ceilings, peak_bf16=1e15), batch=2, model_flops=1.0, launch_s=3e-6)
    assert summary["graphs"] == 3 and summary["graph_launches"] == 6 and summary["launches"] == 8


def test_zero_volumes_follow_deepspeed():
    """Stages 1-2 as DeepSpeed 0.19 runs them: the gradients all-reduced (twice a reduce-scatter's ring
    time) + the parameters all-gathered, the buckets concatenated first (2 x the bf16 parameters at the
    bandwidth); stage 3 as documented: all-gathers twice, reduce-scatters once; a ring in the node over
    NVLink (450 GB/s each way), then the 1/8 shard over 50 GB/s InfiniBand."""
    params = 10 ** 9
    summary = {"phases": {"encoder": 0.0, "forward": 0.01, "loss": 0.0, "backward": 0.02, "optimizer": 0.008}}
    args = dict(summary=summary, params=params, linear_params=params, precision="bf16", nvlink_bytes_per_s=900e9,
                micro_batch=32)
    nv = 7 / 8 * 2e9 / 450e9  # one ring pass over 2 GB (the bf16 gradients, or parameters)
    r = model.zero_projection(gpus=8, stage=2, overlap=False, **args)
    assert r["comm_bytes"] == 6e9 and r["comm_s"] == pytest.approx(3 * nv)
    assert r["step_s"] == pytest.approx(0.03 + 0.001 + 3 * nv)
    concatenated = model.zero_projection(gpus=8, stage=2, overlap=False, bandwidth=1e12, **args)
    assert concatenated["step_s"] == pytest.approx(r["step_s"] + 4e9 / 1e12)
    one = model.zero_projection(gpus=1, stage=2, overlap=False, bandwidth=1e12, **args)
    assert one["step_s"] == pytest.approx(0.038) and one["comm_s"] == 0  # one GPU: no collective, no concatenation
    r3 = model.zero_projection(gpus=8, stage=3, overlap=False, **args)
    assert r3["comm_bytes"] == 6e9 and r3["comm_s"] == pytest.approx(3 * nv)
    overlapped = model.zero_projection(gpus=8, stage=2, overlap=True, **args)
    assert overlapped["exposed_comm_s"] == pytest.approx(nv)  # the all-reduce (2 nv < 20 ms) hides under the backward
    r64 = model.zero_projection(gpus=64, stage=2, overlap=False, **args)
    assert r64["comm_s"] == pytest.approx(3 * (nv + 7 / 8 * (2e9 / 8) / 50e9))
    mixed = model.zero_projection(gpus=8, stage=2, overlap=False, **dict(args, precision="bf16-mixed",
                                                                         linear_params=params // 2))
    assert mixed["comm_bytes"] == 2 * (2 * params // 2 + 4 * params // 2) + 4 * params


def test_smoke_run_writes_the_result_and_bench_report_renders_it(tmp_path, capsys):
    """All four variants on a narrow model, the ZeRO rows, the JSON shape bench.report (and the GPU
    comparison) read, the README sections and the chart."""
    out = tmp_path / "results"
    assert model.main(["--smoke", "--out", str(out), "--zero-gpus", "8", "--global-batch", "16"]) == 0
    printed = capsys.readouterr().out
    assert "Modelled, not measured" in printed and "Assumptions:" in printed and "| 8 | 2 | 3 | yes |" in printed
    (path,) = out.glob("model-h100-sxm-*.json")
    payload = json.loads(path.read_text())
    assert set(payload["variants"]) == set(model.VARIANTS) and payload["assumptions"]
    for v in payload["variants"].values():
        assert set(v["categories"]) == set(model.CATEGORIES)
        assert math.isclose(sum(v["categories"].values()), v["device_step_s"], rel_tol=1e-9)  # the device lane
        assert v["img_per_s"] == pytest.approx(2 / v["step_s"])
        assert v["ideal_step_s"] < v["amdahl_step_s"] <= v["device_step_s"] <= v["step_s"]
        assert math.isclose(sum(v["breakdown_seconds"].values()), v["device_step_s"], rel_tol=1e-9)
        assert set(v["breakdown_seconds"]) == set(v["phase_seconds"]) == {"encoder", "forward", "backward", "optimizer"}
        # each phase the longer of its device and host lanes, the step their sum
        for sp, seconds in v["phase_seconds"].items():
            lanes = {"device": v["breakdown_seconds"][sp], "host": v["host_seconds"][sp]}
            assert seconds == max(lanes.values()) and lanes[v["bound_by"][sp]] == seconds
        assert math.isclose(sum(v["phase_seconds"].values()), v["step_s"], rel_tol=1e-9)
    assert "Lanes per phase (ms)" in printed and payload["host_costs"] == model.HOST_COSTS
    assert any("fitted to train_step-NVIDIA-H200-2026-12-04.json" in a for a in payload["assumptions"])
    eager, compiled = payload["variants"]["reference-eager"], payload["variants"]["reference-compiled"]
    assert compiled["launches"] < eager["launches"] and compiled["bytes"] < eager["bytes"]
    # CUDA graphs: the compiled step's kernels, the encoder's forward and SiT's forward and backward replayed
    # as three graphs, so the same counts in less time
    fused, graphs = payload["variants"]["alignflow-compiled"], payload["variants"]["alignflow-graphs"]
    assert graphs["launches"] == fused["launches"] and graphs["bytes"] == fused["bytes"]
    assert graphs["graphs"] == 3 and 0 < graphs["graph_launches"] < graphs["launches"]
    assert graphs["step_s"] < fused["step_s"] and fused["graph_launches"] == 0

    report = importlib.import_module("bench.report")
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"<!-- BEGIN {s} -->\nstale\n<!-- END {s} -->\n"
                              for s in ("kernel-results", "train-step-results", "data-results", "model-results",
                                        "model-zero-results")))
    assert report.main(["--results", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and "Modelled, not measured" in text and "| alignflow-compiled |" in text
    assert "| 8 | 2 | 1 | no |" in text and path.with_suffix(".md").exists()
    assert path.with_suffix(".png").exists() or importlib.util.find_spec("matplotlib") is None
    # issue 14's goal check, for every non-reference variant, printed and in the README section
    assert "Goal check (issue 14, modelled)" in printed and "Goal check (issue 14, modelled)" in text
    goal = {row["variant"]: row for row in payload["goal"]}
    assert set(goal) == set(model.VARIANTS) - set(model.GOAL_SPEEDUPS)
    fused = payload["variants"]["alignflow"]
    assert goal["alignflow"]["speedups"]["reference-eager"] == pytest.approx(eager["step_s"] / fused["step_s"])
    assert goal["alignflow"]["speedups"]["reference-compiled"] == pytest.approx(compiled["step_s"] / fused["step_s"])
    assert goal["alignflow"]["mfu"] == fused["mfu"]


def _summary(step, categories, flops, mfu):
    """A modelled step with what goal_check reads: one forward phase, its matmuls and attention held whole, no
    GEMM-boundary bytes and no GEMM groups unless a test sets them."""
    return {"step_s": step, "mfu": mfu, "ideal_step_s": sum(flops.values()) / 1e15,
            "categories": {c: categories.get(c, 0.0) for c in model.CATEGORIES},
            "counts": {c: {"flops": flops.get(c, 0.0)} for c in model.CATEGORIES},
            "held_seconds": {c: categories.get(c, 0.0) for c in ("matmul", "attention", "encoder")},
            "boundary_bytes": {}, "gemms": [], "gemm_efficiency": 0.75, "breakdown_seconds": {"forward": step}}


def test_goal_check_names_the_binding_goal_and_the_categories_in_the_way():
    """Hand-made variants (peak 1 PFLOP/s, 1 TB/s): the fused step at 60 ms against a 100 ms eager and a 70 ms
    compiled reference, MFU 30%: the targets are 55.6 ms (1.8x eager), 53.8 ms (1.3x compiled) and 36 ms
    (MFU 50% = 0.3 x 60 / 0.5): MFU binds and 24 ms must go. Above the ideal: optimizer 15, matmul
    30 - 20 = 10, pointwise 5: the optimizer and the matmuls cover the 24 ms, the pointwise ops are not
    needed; each comes with its floor. A variant that meets every goal lists nothing."""
    peak = 1e15
    variants = {
        "reference-eager": _summary(0.100, {"matmul": 0.100}, {"matmul": 20e12}, 0.18),
        "reference-compiled": _summary(0.070, {"matmul": 0.070}, {"matmul": 20e12}, 0.257),
        "alignflow": _summary(0.060, {"matmul": 0.030, "optimizer": 0.015, "pointwise": 0.005, "attention": 0.010},
                              {"matmul": 20e12, "attention": 10e12}, 0.30),
        "fast": _summary(0.030, {"matmul": 0.030}, {"matmul": 20e12}, 0.6),
    }
    # 200M parameters, 28 bytes a parameter at the least (fp32 weights: 24 + a 4-byte gradient read), 40 modelled
    floor_bytes = model.optimizer_floor_bytes(False)
    variants["alignflow"].update(params=200e6, optimizer_floor_bytes_per_param=floor_bytes)
    variants["alignflow"]["counts"]["optimizer"].update(bytes=8e9, launches=70)
    rows = {r["variant"]: r for r in model.goal_check(variants, peak, bandwidth=1e12)}
    assert set(rows) == {"alignflow", "fast"}
    row = rows["alignflow"]
    assert row["speedups"] == pytest.approx({"reference-eager": 100 / 60, "reference-compiled": 70 / 60})
    assert row["targets_s"] == pytest.approx({"1.8x reference-eager": 0.1 / 1.8, "1.3x reference-compiled": 0.07 / 1.3,
                                              "MFU 50%": 0.036})
    assert row["binding"] == "MFU 50%" and not row["met"] and row["to_cut_s"] == pytest.approx(0.024)
    assert [w["category"] for w in row["in_the_way"]] == ["optimizer", "matmul"]
    assert [w["above_ideal_s"] for w in row["in_the_way"]] == pytest.approx([0.015, 0.010])
    # the floors: the optimizer's 28 B x 200M at 1 TB/s = 5.6 ms; the matmuls' 20 TFLOP at 1 PFLOP/s = 20 ms
    assert [w["floor_s"] for w in row["in_the_way"]] == pytest.approx([0.0056, 0.020])
    assert [w["modelled_s"] for w in row["in_the_way"]] == pytest.approx([0.015, 0.030])
    assert [w["note"] for w in row["in_the_way"]] == ["40 B a parameter vs 28, 70 launches", "20.0 TFLOP"]
    assert row["above_ideal_s"]["attention"] == pytest.approx(0.0)
    assert rows["fast"]["met"] and rows["fast"]["in_the_way"] == [] and rows["fast"]["to_cut_s"] == 0
    table = "\n".join(model.goal_table(list(rows.values())))
    assert ("| alignflow | 1.67x | 1.17x | 30.0% | no | 36.0 (MFU 50%) | 24.0 | optimizer 15.0, matmul 10.0 | "
            "optimizer 15.0 / 5.6 (40 B a parameter vs 28, 70 launches); matmul 30.0 / 20.0 (20.0 TFLOP) |") in table
    assert "- matmul: floor = its executed FLOPs at the dense bf16 peak" in table
    assert "- optimizer: floor = the bytes its step must move" in table and "- pointwise" not in table
    assert "| fast | 3.33x | 2.33x | 60.0% | yes |" in table


def test_goal_budget_holds_the_gemms_and_sets_the_rest_against_its_floors():
    """Hand-made step (peak 1 PFLOP/s, 1 TB/s) at 60 ms, MFU 40%: the goal is 0.4 x 60 / 0.5 = 48 ms (the
    references allow 55.6 and 53.8). Held: matmul 30 + attention 10 + the encoder's GEMMs 2 = 42 ms, so the
    rest may take 6 ms; it takes 18 (optimizer 10, pointwise 5, the encoder's other ops 1, the host's 2 in
    its host-bound forward). Floors: optimizer 28 B x 200M = 5.6 ms, pointwise 1 GB = 1 ms, encoder 0.5 GB
    = 0.5 ms: 7.1 ms, above the 6. GEMMs at 75%: forward 3 x 4 ms (3 ms at the peak, 0.1 ms of bytes),
    backward 18 ms (13.5 at the peak). The forward stays host-bound at 19 ms however fast its GEMMs, so
    only the backward's count: 3 + 19 + (10 + 13.5 / f) + 10 = 48 needs f = 2.25."""
    variants = {"reference-eager": _summary(0.100, {"matmul": 0.100}, {"matmul": 20e12}, 0.18),
                "reference-compiled": _summary(0.070, {"matmul": 0.070}, {"matmul": 20e12}, 0.257)}
    ms = 1e-3
    v = _summary(60 * ms, {"matmul": 30 * ms, "attention": 10 * ms, "optimizer": 10 * ms, "pointwise": 5 * ms,
                           "encoder": 3 * ms}, {"matmul": 22.5e12, "attention": 5e12, "encoder": 1e12}, 0.40)
    v["counts"]["optimizer"].update(bytes=8e9, launches=70)
    v.update(params=200e6, optimizer_floor_bytes_per_param=model.optimizer_floor_bytes(False),
             device_step_s=58 * ms, held_seconds={"matmul": 30 * ms, "attention": 10 * ms, "encoder": 2 * ms},
             boundary_bytes={"pointwise": 1e9, "encoder": 0.5e9},
             breakdown_seconds={"encoder": 3 * ms, "forward": 17 * ms, "backward": 28 * ms, "optimizer": 10 * ms},
             host_seconds={"encoder": 0.0, "forward": 19 * ms, "backward": 1 * ms, "optimizer": 1 * ms},
             bound_by={"encoder": "device", "forward": "host", "backward": "device", "optimizer": "device"},
             gemms=[{"step_phase": "forward", "at_peak_s": 3 * ms, "memory_s": 0.1 * ms, "launch_s": 0.0, "count": 3},
                    {"step_phase": "backward", "at_peak_s": 13.5 * ms, "memory_s": 0.0, "launch_s": 0.0, "count": 1}])
    variants["alignflow"] = v
    row = model.goal_check(variants, 1e15, bandwidth=1e12)[0]
    assert row["goal_step_s"] == pytest.approx(48 * ms) and row["binding"] == "MFU 50%"
    budget = row["budget"]
    assert budget["held_s"] == pytest.approx(42 * ms) and budget["budget_s"] == pytest.approx(6 * ms)
    assert budget["rest_s"] == pytest.approx(18 * ms) and budget["floor_s"] == pytest.approx(7.1 * ms)
    rest = {c["category"]: (c["modelled_s"], c["floor_s"]) for c in budget["categories"]}
    assert list(rest) == [c for c in model.CATEGORIES if c not in ("matmul", "attention")] + ["host"]
    assert rest["optimizer"] == pytest.approx((10 * ms, 5.6 * ms)) and rest["pointwise"] == pytest.approx((5 * ms, ms))
    assert rest["encoder"] == pytest.approx((ms, 0.5 * ms)) and rest["host"] == pytest.approx((2 * ms, 0.0))
    assert rest["norm/modulate"] == (0.0, 0.0)
    assert model.step_at_gemm_efficiency(v, 0.75) == pytest.approx(60 * ms)
    assert budget["gemm_efficiency_needed"] == pytest.approx(2.25)
    assert model.gemm_efficiency_needed(v, 60 * ms) == pytest.approx(0.75)  # met as modelled
    assert model.gemm_efficiency_needed(v, 40 * ms) is None  # GEMMs at no time: 3 + 19 + 10 + 10 = 42 ms
    table = "\n".join(model.goal_table([row]))
    assert ("| alignflow | 48.0 | 42.0 | 6.0 / 18.0 / 7.1 (floors above the budget: out of reach at the modelled "
            "GEMM rate) | norm/modulate 0.0 / 0.0 (none derived: fusion moves all of it); pointwise 5.0 / 1.0 "
            "(1.00 GB at GEMM boundaries); ") in table
    assert ("optimizer 10.0 / 5.6 (40 B a parameter vs 28, 70 launches); encoder 1.0 / 0.5 (0.50 GB at GEMM "
            "boundaries); losses 0.0 / 0.0 (none derived: fusion moves all of it); host 2.0 / 0.0 (host-bound: "
            "forward) | 225% (75%) |") in table
    assert table.count("- optimizer: floor =") == 1 and "- host: the host lane's time" in table


def test_gemm_boundary_bytes_count_what_cublas_forces():
    """A cuBLAS GEMM's output is read once per step phase by the memory-bound ops that use it, a GEMM input
    they produce is written once; nothing is counted for tensors that attention touches, nor for the reads
    of an op whose outputs only the optimizer reads (a weight gradient's cast)."""
    def op(name, category, reads, writes, step_phase="forward", flops=0.0):
        return model.Op(name, step_phase, category, flops=flops, reads=reads, writes=writes, step_phase=step_phase)

    ops = [op("mm", "matmul", [("w", 8)], [("a", 100)], flops=1.0),
           op("add", "pointwise", [("a", 100), ("x", 50)], [("b", 80)]),            # reads a: 100
           op("mul", "pointwise", [("a", 100)], [("c", 30)]),                       # a again: not counted
           op("mm", "matmul", [("b", 80), ("c", 30)], [("d", 60)], flops=1.0),      # b, c written for it: 80 + 30
           op("native_layer_norm", "norm/modulate", [("d", 60)], [("e", 40)]),      # e: only the optimizer's
           op("_fused_adamw_", "optimizer", [("e", 40)], [("w", 8)], "optimizer"),
           op("mm", "matmul", [("b", 80)], [("q", 90)], flops=1.0),
           op("triton:_attn_fwd_kernel", "attention", [("q", 90)], [("o", 90)], flops=1.0),
           op("clone", "casts/copies", [("q", 90)], [("f", 90)]),                   # q: attention's too
           op("gelu_backward", "pointwise", [("a", 100), ("f", 90)], [("g", 64)], "backward"),  # a in the backward
           op("mm", "matmul", [("g", 64)], [("h", 20)], "backward", flops=1.0)]     # g written for it: 64
    assert model.gemm_boundary_bytes(ops) == {"pointwise": 100 + 80 + 30 + 100 + 64}


@pytest.fixture(scope="module")
def fused_step_ops():
    return model.trace_step(backend="triton", **model.BASELINE_CONFIG)["ops"]


def test_fused_step_bytes_and_launches_stay_within_the_baseline(fused_step_ops):
    """The regression guard: bytes and launches of the alignflow step at SiT-XL/2, batch 32, against
    bench/results/model-baseline.json. A failure names the ops that grew."""
    with open(model.BASELINE_PATH) as f:
        baseline = json.load(f)
    assert baseline["config"] == model.BASELINE_CONFIG
    problems = model.compare_to_baseline(fused_step_ops, baseline)
    assert not problems, "\n".join(problems)


def test_fused_step_counts_are_identical_to_the_record(fused_step_ops):
    """The proof that a refactor changed nothing, beside the frozen numerics
    (tests/engine/test_numerics_frozen.py): under the recorded torch and Triton, every op's bytes and
    launches in the alignflow step equal bench/results/model-baseline.json's, to the byte. The guard
    above allows +2%; this allows nothing, so a change meant to move the counts (lowering them, say)
    refreshes the record with one command, in its own commit."""
    with open(model.BASELINE_PATH) as f:
        baseline = json.load(f)
    recorded, now = baseline.get("environment"), model.baseline_environment()
    if recorded != now:
        pytest.skip(f"the record was counted under {recorded}, this run has {now}: another torch or Triton "
                    "may trace differently; only the 2% guard applies")
    moved = model.compare_exactly(fused_step_ops, baseline)
    assert not moved, (
        f"{len(moved)} op(s) of the fused step count differently from bench/results/model-baseline.json "
        "(a pure refactor must leave every count identical): " + "; ".join(moved)[:3000]
        + ". If the change is meant to move them, refresh the record with `python -m bench.model "
        "--write-baseline` and commit bench/results/model-baseline.json in its own commit, saying why.")


def test_the_exact_check_names_every_op_that_moved(fused_step_ops):
    """One op's bytes lower and one op gone from the record: both named, old -> new."""
    counts = model.baseline_counts(fused_step_ops)
    lowered = "backward | norm/modulate | triton:_adaln_bwd_kernel"
    edited = {k: dict(c) for k, c in counts.items()}
    edited[lowered]["bytes"] += 4096
    gone = sorted(edited)[0]
    del edited[gone]
    moved = model.compare_exactly(fused_step_ops, {"ops": edited})
    assert len(moved) == 2, moved
    assert any(m.startswith(f"{lowered}: bytes {counts[lowered]['bytes'] + 4096:.0f} -> ") for m in moved), moved
    assert any(m.startswith(f"{gone}: bytes 0 -> ") for m in moved), moved
    assert not model.compare_exactly(fused_step_ops, {"ops": counts})


def test_the_guard_names_the_ops_that_grew(fused_step_ops):
    """A baseline 5% below today's counts fails, naming the op that grew and how to update the baseline."""
    counts = model.baseline_counts(fused_step_ops)
    key = "backward | norm/modulate | triton:_adaln_bwd_kernel"
    total_bytes = sum(c["bytes"] for c in counts.values())
    shrunk = {k: dict(c) for k, c in counts.items()}
    shrunk[key]["bytes"] -= 0.05 * total_bytes
    baseline = {"bytes": total_bytes * 0.95, "launches": sum(c["launches"] for c in counts.values()), "ops": shrunk}
    problems = model.compare_to_baseline(fused_step_ops, baseline)
    assert len(problems) == 1 and "bytes grew" in problems[0] and key in problems[0]
    assert "--write-baseline" in problems[0]
    assert not model.compare_to_baseline(fused_step_ops, dict(baseline, bytes=total_bytes * 0.99))


def _zero_passes(trace):
    """The ZeRO stand-in's ops: (backward ones, step ones), and sums of bytes by op name."""
    ops = [op for op in trace["ops"] if op.category == "optimizer"]
    backward = [op for op in ops if op.phase == "backward"]
    step = [op for op in ops if op.phase == "optimizer"]
    assert backward and step and all(op.step_phase == "backward" for op in backward)
    return backward, step


def _sums(ops, name, where=lambda op: True):
    chosen = [op for op in ops if op.name == name and where(op)]
    return sum(op.read for op in chosen), sum(op.written for op in chosen)


def test_bf16_mode_traces_deepspeeds_zero2_passes():
    """--precision bf16 (DeepSpeed's bf16 mode, bench.model._ZeroOptimizer's docstring), by hand, bytes a
    parameter: in the backward each bf16 gradient copied into its bucket (2 + 2) and the bucket divided by
    the world size (2 + 2); in the step the copy into the partition (2 + 2), the overflow check's amax and
    amin (2 + 2), the norm's fp64 cast (2 + 8) and vector_norm (8), the flat concatenation (2 + 2), its fp32
    cast (2 + 4), the clip's scaling (4 + 4), fused AdamW on the fp32 master, the master copied back into
    the bf16 weights (4 + 2)."""
    trace = model.trace_step(backend="triton", **dict(SMALL, precision="bf16"))
    P = trace["params"]
    backward, step = _zero_passes(trace)
    assert _sums(backward, "copy_") == (2 * P, 2 * P) and _sums(backward, "div_") == (2 * P, 2 * P)
    assert _sums(step, "copy_", lambda op: op.read == op.written) == (2 * P, 2 * P)
    assert _sums(step, "copy_", lambda op: op.read != op.written) == (4 * P, 2 * P)
    assert _sums(step, "amax")[0] == 2 * P and _sums(step, "amin")[0] == 2 * P
    assert _sums(step, "_to_copy", lambda op: op.written == 4 * op.read) == (2 * P, 8 * P)
    assert 8 * P <= _sums(step, "linalg_vector_norm")[0] <= 8 * P + 64
    assert _sums(step, "cat") == (2 * P, 2 * P)
    assert _sums(step, "_to_copy", lambda op: op.written == 2 * op.read) == (2 * P, 4 * P)
    assert _sums(step, "mul_") == (4 * P + 4, 4 * P)
    adam = next(op for op in step if op.name == "_fused_adamw_")
    assert adam.read == 4 * 4 * P + 4 and adam.written == 3 * 4 * P  # master, grad, m, v, step read; master, m, v
    matmuls = [op for op in trace["ops"] if op.flops and op.phase in ("forward", "backward")]
    assert matmuls and all(op.matmul_dtype == "bf16" for op in matmuls)


def test_measured_ceilings_replace_the_datasheet(tmp_path):
    """A GPU run's recorded copy bandwidth and bf16 matmul rate (bench/common.py's, in a kernels result)
    replace the datasheet figures of the preset whose name it matches, and say where they come from."""
    datasheet = model.device_ceilings("h100-sxm", str(tmp_path))
    assert datasheet["bandwidth"] == pytest.approx(3.35e12 * model.BANDWIDTH_EFFICIENCY)
    result = {"environment": {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-03"},
              "ceilings": {"copy_bytes_per_s": 2.9e12, "matmul_flop_per_s": 7.1e14}}
    (tmp_path / "kernels-NVIDIA-H100-80GB-HBM3-2026-12-03.json").write_text(json.dumps(result))
    measured = model.device_ceilings("h100-sxm", str(tmp_path))
    assert measured["bandwidth"] == 2.9e12 and measured["bf16"] == 7.1e14
    assert "measured" in measured["bandwidth_from"] and "kernels-NVIDIA-H100" in measured["bf16_from"]
    assert model.device_ceilings("a100-80gb", str(tmp_path))["bf16"] == pytest.approx(312e12 * model.MATMUL_EFFICIENCY)


def test_a_fused_op_reached_as_its_custom_op_is_costed_by_its_real_launches(monkeypatch):
    """Under torch.compile the kernels run as registered custom ops: the tracer runs their real
    launcher (not the fake implementation) and records the same Triton launches as the eager path."""
    def run():
        x = torch.randn(2, 64, 72, requires_grad=True)
        gate, shift, scale = (torch.randn(2, 72, requires_grad=True) for _ in range(3))
        with kernels.use_backend("triton"):
            x_new, y = kernels.adaln_residual_modulate(x, torch.randn_like(x), gate, shift, scale)
        (x_new.sum() + y.sum()).backward()

    def launches(ops):
        return [(op.name, op.bytes) for op in ops if op.name.startswith("triton:")]

    eager = launches(_trace(run))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert launches(_trace(run)) == eager and [n for n, _ in eager] == ["triton:_adaln_fwd_kernel",
                                                                        "triton:_adaln_bwd_kernel"]


def test_trainer_variant_adds_zero2_passes_and_the_ema_update():
    """The trainer's step under bf16-mixed (fp32 weights, DeepSpeed's torch_autocast), bytes a parameter:
    the fp32 gradients copied into the buckets (4 + 4) and divided (4 + 4); the buckets of Linear/Conv
    gradients (L of the P parameters) cast to bf16 for the all-reduce (4 + 2) and copied back twice (2 + 4
    each); in the step the copy into the partition (4 + 4), the fp64 norm cast (4 + 8), no overflow check and
    no fp32 cast, the concatenation (4 + 4), the master copied into the fp32 weights (4 + 4) and the EMA's
    one _foreach_lerp_ over the masters (reads EMA and master, writes the EMA: 8 + 4)."""
    trace = model.trace_step(backend="triton", trainer=True, **SMALL)
    P, L = trace["params"], trace["linear_params"]
    assert 0 < L < P
    backward, step = _zero_passes(trace)
    assert _sums(backward, "div_") == (4 * P, 4 * P)
    assert _sums(backward, "_to_copy") == (4 * L, 2 * L)
    assert _sums(backward, "copy_") == (4 * P + 2 * 2 * L, 4 * P + 2 * 4 * L)
    assert not [op for op in step if op.name in ("amax", "amin")]
    assert _sums(step, "_to_copy", lambda op: op.written == 2 * op.read) == (4 * P, 8 * P)  # the norm's fp64 casts
    assert _sums(step, "cat") == (4 * P, 4 * P)
    assert _sums(step, "copy_") == (2 * 4 * P, 2 * 4 * P)
    (ema,) = [op for op in step if op.name == "_foreach_lerp_"]
    assert ema.read == 8 * P and ema.written == 4 * P


def test_the_trainer_rows_follow_the_generated_overflow_check(tmp_path):
    """The stand-in runs DeepSpeed's bf16 overflow check (amax and amin per gradient) as engine.config
    generates bf16.check_grad_overflow: off with optim.fused_clip (ClippedAdamW skips instead), on
    without, and a JSON's own value either way."""
    import json

    assert model.zero_checks_grad_overflow(True) is False and model.zero_checks_grad_overflow(False) is True
    for explicit in (True, False):
        path = tmp_path / f"zero2_{explicit}.json"
        path.write_text(json.dumps({"bf16": {"check_grad_overflow": explicit}}))
        assert model.zero_checks_grad_overflow(True, str(path)) is model.zero_checks_grad_overflow(False, str(path)) \
            is explicit

    def overflow_check_ops(fused_clip):
        trace = model.trace_step(backend="triton", trainer=True, precision="bf16", fused_clip=fused_clip, **SMALL)
        _, step = _zero_passes(trace)
        return [op for op in step if op.name in ("amax", "amin")]

    assert not overflow_check_ops(True)
    assert len(overflow_check_ops(False)) >= 2


def test_the_modelled_compiled_step_is_deterministic():
    """Storage keys are addresses: the tracer keeps every tensor alive so that none is reused by a later
    tensor, which would make a freed intermediate look read after its fused run."""
    def fused_bytes():
        ops = model.trace_step(backend="torch", **SMALL)["ops"]
        return [(op.name, op.read, op.written) for op in model.fuse_compiled(ops)]

    assert fused_bytes() == fused_bytes()


@pytest.mark.parametrize("trainer", [False, True])
def test_fused_clip_folds_the_scaling_pass_into_adamw(trainer):
    """optim.fused_clip: the gradients are read once for the norm and fused AdamW divides by the clip
    factor (torch's grad_scale, which writes the divided gradients back: 4 bytes a parameter) in
    place of clip_grad_norm_'s in-place scaling pass (read 4 + write 4)."""
    def optimizer_ops(fused_clip):
        trace = model.trace_step(backend="triton", trainer=trainer, fused_clip=fused_clip, **SMALL)
        return trace["params"], [op for op in trace["ops"] if op.phase == "optimizer"]

    P, separate = optimizer_ops(False)
    _, fused = optimizer_ops(True)
    names = [op.name for op in fused]
    scaling = "mul_" if trainer else "_foreach_mul_"  # DeepSpeed scales the flat fp32 gradient; torch each one
    norm = "linalg_vector_norm" if trainer else "_foreach_norm"  # DeepSpeed's norm: one per gradient
    (scale,) = [op for op in separate if op.name == scaling]
    assert scale.written == 4 * P and scaling not in names
    assert names.count(norm) == [op.name for op in separate].count(norm) >= 1 and names.count("_fused_adamw_") == 1
    adam = next(op for op in fused if op.name == "_fused_adamw_")
    reference = next(op for op in separate if op.name == "_fused_adamw_")
    assert adam.written == reference.written + 4 * P  # the divided gradients
    assert adam.read == reference.read + 8  # the divisor and found_inf (1.0 skips a non-finite step)
    saved = sum(op.bytes for op in separate) - sum(op.bytes for op in fused)
    assert abs(saved - 4 * P) <= 1024  # the scaling pass (8P) less the write-back (4P), up to scalar ops
    # less the non-finite skip's launches (found_inf: mul, nan_to_num_; the step counts' _foreach_sub_)
    skip = 2 + sum(op.launches for op in fused if op.name == "_foreach_sub_")
    assert sum(op.launches for op in fused) - skip <= sum(op.launches for op in separate)  # 112 -> 79 at SiT-XL/2


@pytest.mark.parametrize("trainer", [False, True])
def test_bf16_copies_move_the_weight_casts_into_one_refresh_after_the_step(trainer):
    """train.bf16_weight_copies (the alignflow-bf16-copies variant; the trainer's bf16-mixed step, where
    'auto' is on): the forward casts no weight or bias (read 4 + write 2 bytes each, one launch each,
    the batched modulation's concatenating copies included); one _foreach_copy_ after the optimizer step
    writes the copies instead (read 4 + write 2, multi-tensor launches); nothing else moves."""
    def trace(bf16_copies):
        return model.trace_step(backend="triton", trainer=trainer, fused_clip=True, bf16_copies=bf16_copies, **SMALL)

    plain, copied = trace(False), trace(True)
    N = copied["bf16_copied_params"]  # every Linear's and the patch embedding's weight and bias
    assert plain["bf16_copied_params"] == 0 and copied["linear_params"] < N < copied["params"]
    # attn.proj's and mlp.fc2's biases go to the adaLN kernel in fp32 (model.fused_bias_grad, as on a GPU):
    # never cast, so their copies (written all the same) replace no cast
    handed_on = 2 * SMALL["model_overrides"]["depth"] * SMALL["model_overrides"]["hidden_size"]
    before, after = model.baseline_counts(plain["ops"]), model.baseline_counts(copied["ops"])
    moved = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    casts = ("forward | casts/copies | _to_copy", "forward | casts/copies | copy_")
    assert moved == {*casts, "optimizer | optimizer | _foreach_copy_"}, moved
    saved = sum(before[k]["bytes"] for k in casts) - sum(after.get(k, {"bytes": 0})["bytes"] for k in casts)
    assert saved == 6 * (N - handed_on)
    (refresh,) = [op for op in copied["ops"] if op.name == "_foreach_copy_"]
    assert refresh.step_phase == "optimizer" and refresh.read == 4 * N and refresh.written == 2 * N
    assert sum(c["launches"] for c in after.values()) < sum(c["launches"] for c in before.values())


@pytest.mark.parametrize("trainer,bf16_copies", [(False, False), (False, True), (True, True)])
def test_adamw_kernel_reads_each_gradient_once_and_writes_the_copies_in_its_pass(trainer, bf16_copies):
    """optim.step_kernel alignflow (alignflow-adamw-kernel; with the copies alignflow-graphs-all's step, and
    in the trainer at ZeRO-0 trainer-bf16-mixed-zero0-graphs-all's, its EMA update unchanged):
    torch's fused AdamW (which writes the divided gradients back) and the copies' _foreach_copy_ (read
    4 + write 2) give way to one csrc/adamw.cu launch reading param, gradient and moments (16 bytes a
    parameter and the divisor) and writing param and moments (12) and the bf16 copies (2); the norm and
    everything before the optimizer stay as they were; the step counts advance by isfinite(divisor)."""
    def trace(step_kernel):
        stage = dict(trainer=True, zero_stage=0) if trainer else {}
        return model.trace_step(backend="triton", fused_clip=True, bf16_copies=bf16_copies, step_kernel=step_kernel,
                                bf16_grads=False, **stage, **SMALL)

    torch_step, ours = trace("torch"), trace("alignflow")
    P, N = ours["params"], ours["bf16_copied_params"]
    assert (N > 0) == bf16_copies
    before, after = model.baseline_counts(torch_step["ops"]), model.baseline_counts(ours["ops"])
    moved = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    # torch's kernel and its step counts' correction for a skipped step (_foreach_sub_ of found_inf) ...
    replaced = {"optimizer | optimizer | _fused_adamw_", "optimizer | optimizer | _foreach_sub_"}
    replaced |= {"optimizer | optimizer | _foreach_copy_"} if bf16_copies else set()
    # ... give way to ours and the step counts advanced by isfinite(divisor) (1 - found_inf), the flag kept for the host
    added = {"optimizer | optimizer | cuda:adamw_step", "optimizer | optimizer | _foreach_add_",
             "optimizer | optimizer | rsub", "optimizer | optimizer | clone"}
    assert replaced <= set(before) and not replaced & set(after) and moved <= replaced | added, moved
    # one call per kind of parameter: with copies (every Linear's and the patch embedding's) and without
    adams = [op for op in ours["ops"] if op.name == "cuda:adamw_step"]
    assert len(adams) == 1 + bf16_copies and {op.step_phase for op in adams} == {"optimizer"}
    assert all(op.launches == 1 for op in adams)  # every traced size a multiple of the vector width
    assert sum(op.read for op in adams) == 16 * P + 4 * len(adams) and sum(op.written for op in adams) == 12 * P + 2 * N
    torch_adam = next(op for op in torch_step["ops"] if op.name == "_fused_adamw_")
    assert torch_adam.written == 16 * P  # param, moments and the divided gradients
    saved = sum(op.bytes for op in torch_step["ops"]) - sum(op.bytes for op in ours["ops"])
    assert abs(saved - (4 * P + 4 * N)) <= 1024  # the write-back and the copies' fp32 read, up to scalar ops
    # no more launches (at SiT-XL/2 the optimizer's 86 -> 50: torch's kernel takes one per chunk of tensors)
    assert sum(c["launches"] for c in after.values()) <= sum(c["launches"] for c in before.values())


@pytest.mark.parametrize("trainer", [False, True])
def test_bf16_grads_drop_the_gradient_casts_and_halve_the_gradient_reads(trainer):
    """train.bf16_weight_grads (alignflow-graphs-all; 'auto' in trainer-bf16-mixed-zero0-graphs-all): the
    weight and bias gradients the copies take stay bf16. For those G elements the backward's casts to fp32
    (read 2, write 4) are gone, and the norm and the AdamW kernel read 2 bytes an element instead of 4:
    10 G bytes in all, with G nearly every copied element (the biases the fused kernels sum in fp32 aside);
    the forward does not move."""
    stage = dict(trainer=True, zero_stage=0) if trainer else {}

    def trace(bf16_grads):
        return model.trace_step(backend="triton", fused_clip=True, bf16_copies=True, step_kernel="alignflow",
                                bf16_grads=bf16_grads, **stage, **SMALL)

    fp32, bf16 = trace(False), trace(True)
    if trainer:  # the trainer's 'auto' is on at ZeRO-0 with the kernel and the copies
        auto = model.trace_step(backend="triton", fused_clip=True, step_kernel="alignflow", **stage, **SMALL)
        assert model.baseline_counts(auto["ops"]) == model.baseline_counts(bf16["ops"])

    def phase_bytes(trace, phase, name=None):
        return sum(op.bytes for op in trace["ops"] if op.step_phase == phase and name in (None, op.name))

    G = (phase_bytes(fp32, "optimizer", "cuda:adamw_step") - phase_bytes(bf16, "optimizer", "cuda:adamw_step")) / 2
    N = bf16["bf16_copied_params"]
    assert 0.95 * N < G <= N
    assert phase_bytes(fp32, "backward") - phase_bytes(bf16, "backward") == pytest.approx(6 * G, abs=64)
    assert phase_bytes(fp32, "optimizer") - phase_bytes(bf16, "optimizer") == pytest.approx(4 * G, abs=64)  # + the norm
    assert phase_bytes(fp32, "forward") == phase_bytes(bf16, "forward")
    casts = {"fp32": fp32, "bf16": bf16}
    counts = {k: sum(op.launches for op in t["ops"] if op.step_phase == "backward" and op.category == "casts/copies")
              for k, t in casts.items()}
    assert counts["bf16"] < counts["fp32"]


def test_switch_off_variants_undo_their_switch_alone():
    """bench.train_step's alignflow-no-* variants (modelled when named, and by bench.predict where measured)
    trace alignflow with one SiT switch off: without batched modulation one modulation matmul per block
    comes back, without the fused bias gradient nn.Linear's bias sums, without the fused GELU torch's
    GELU backward instead of the Triton one; the optimizer does not move."""
    from bench.train_step import SWITCH_OFF_VARIANTS

    def counts(overrides):
        return model.baseline_counts(model.trace_step(backend="triton", fused_clip=True, model_config=overrides,
                                                      **SMALL)["ops"])

    base = counts({})
    blocks = SMALL["model_overrides"]["depth"]
    for name, overrides in SWITCH_OFF_VARIANTS.items():
        assert model.OPT_IN_VARIANTS[name] == ("alignflow", overrides)
        off = counts(overrides)
        moved = {k for k in set(base) | set(off) if base.get(k) != off.get(k)}
        assert moved and not any(k.startswith("optimizer") for k in moved), (name, moved)
        if "batched_modulation" in overrides:
            key = "forward | matmul | addmm"
            assert off[key]["launches"] == base[key]["launches"] + blocks, (name, base[key], off[key])
        if "fused_bias_grad" in overrides:
            key = "backward | reductions | sum"
            assert off[key]["launches"] > base.get(key, {"launches": 0})["launches"], name
        if "fused_gelu" in overrides:
            assert "backward | pointwise | triton:_gelu_bwd_kernel" in base
            assert "backward | pointwise | triton:_gelu_bwd_kernel" not in off
            assert off["backward | pointwise | gelu_backward"]["launches"] == blocks


def test_the_adamw_kernel_is_modelled_in_clipped_adamw_only():
    with pytest.raises(ValueError, match="step_kernel 'alignflow': modelled in ClippedAdamW"):
        model.trace_step(backend="triton", fused_clip=False, step_kernel="alignflow", **SMALL)
    with pytest.raises(ValueError, match="step_kernel 'alignflow': modelled in ClippedAdamW"):
        model.trace_step(backend="triton", trainer=True, fused_clip=True, step_kernel="alignflow", **SMALL)  # ZeRO-2


def test_trainer_at_stage_zero_is_the_fused_step_with_the_ema_update():
    """trainer-bf16-mixed-zero0 (DeepSpeed's engine without ZeRO, _StageZeroEngine): the benchmark's fused
    step with the bf16 weight copies written by ClippedAdamW (alignflow-bf16-copies) plus the trainer's EMA,
    one _foreach_lerp_ over the fp32 parameters (8 + 4 bytes a parameter, one multi-tensor host call),
    and no DeepSpeed hook; with DeepSpeed's gradient all-reduce (which the trainer skips on one rank) the
    backward also flattens every gradient into buckets and copies it back (4 + 4 each)."""
    common = dict(SMALL, backend="triton", fused_clip=True)
    fused = model.trace_step(bf16_copies=True, **common)
    zero0 = model.trace_step(trainer=True, zero_stage=0, **common)
    P = zero0["params"]
    assert zero0["bf16_copied_params"] == fused["bf16_copied_params"] > 0
    before, after = model.baseline_counts(fused["ops"]), model.baseline_counts(zero0["ops"])
    moved = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert moved == {"optimizer | optimizer | _foreach_lerp_"}, moved
    (ema,) = [op for op in zero0["ops"] if op.name == "_foreach_lerp_"]
    assert ema.step_phase == "optimizer" and ema.read == 8 * P and ema.written == 4 * P
    hosts = {name: model.count_host(t["host"], t["ops"]) for name, t in (("fused", fused), ("zero0", zero0))}
    assert hosts["zero0"]["optimizer"]["multi_tensor"] == hosts["fused"]["optimizer"]["multi_tensor"] + 1
    assert all(c["zero_hook"] == 0 for c in hosts["zero0"].values())
    assert {sp: c for sp, c in hosts["zero0"].items() if sp != "optimizer"} == \
        {sp: c for sp, c in hosts["fused"].items() if sp != "optimizer"}

    reduced = model.trace_step(trainer=True, zero_stage=0, allreduce=True, **common)
    added = [op for op in reduced["ops"] if op.step_phase == "backward" and op.category == "optimizer"]
    assert {op.name for op in added} == {"cat", "copy_"}
    assert _sums(added, "cat") == (4 * P, 4 * P) and _sums(added, "copy_") == (4 * P, 4 * P)
    assert [op.name for op in added].count("cat") == 1  # one bucket: fewer than 5e8 elements
    ids = {id(op) for op in added}
    assert model.baseline_counts([op for op in reduced["ops"] if id(op) not in ids]) == \
        model.baseline_counts(zero0["ops"])  # the rest as with the skip


def test_the_trainer_is_modelled_at_stages_zero_and_two_only():
    with pytest.raises(ValueError, match="ZeRO stage 1"):
        model.trace_step(backend="triton", trainer=True, fused_clip=True, zero_stage=1, **SMALL)
    with pytest.raises(ValueError, match="stage 0 under --precision 'bf16'"):
        model.trace_step(backend="triton", trainer=True, fused_clip=True, zero_stage=0, **dict(SMALL, precision="bf16"))
    with pytest.raises(ValueError, match="allreduce"):
        model.trace_step(backend="triton", trainer=True, fused_clip=True, allreduce=True, **SMALL)
    assert "trainer-bf16-mixed-zero0" in model.VARIANTS and "trainer-bf16-zero1" not in model.VARIANTS
