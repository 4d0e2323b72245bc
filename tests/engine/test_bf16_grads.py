"""bf16 weight gradients (engine/bf16_copies.py WeightCopies(grads=True), train.bf16_weight_grads): the bf16
copies are the autograd leaves of the matmuls' weight gradients, which stay bf16 instead of being cast to
fp32 into `.grad`; ClippedAdamW (step_kernel "alignflow", the CUDA C++ kernel in the emulator here) reads
them through `set_gradient_source`. Every number is the cast path's, bit for bit: gradients, the clip
norm, params, moments and copies over steps."""
import copy

import pytest
import torch

import kernels
from engine.bf16_copies import CONCAT_WEIGHT_COPY, WeightCopies
from engine.optim import ClippedAdamW, total_norm
from tests.engine.common import randomize, tiny_model
from tests.helpers import assert_close
from tests.kernels import csrc_fixtures

csrc_build = csrc_fixtures.csrc_build  # autouse: the emulated build and ALIGNFLOW_CUEMU=1
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _torch_linear(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)  # see test_bf16_copies.py


def loss_of(model, seed: int):
    """A loss over every output of a tiny REG + CAR-Flow SiT on fresh inputs, under CPU bf16 autocast."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)
    y, cls = torch.randint(0, 10, (3,), generator=g), torch.randn(3, 24, generator=g)
    with kernels.use_backend("torch"), torch.autocast("cpu", dtype=BF16):
        velocity, zs, cls_velocity = model(x, t, y, cls)
        mu0, mu1 = model.car_flow_shifts(y)
    outputs = [velocity, *zs, cls_velocity, mu0, mu1]
    return sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outputs)


def pair(**options):
    reference = randomize(tiny_model(reg=True, car_flow="joint", z_dims=[24, 16], **options))
    return reference, copy.deepcopy(reference)


def gradients(model, copies):
    """{name: gradient} of every trainable param: `.grad`, else its copy's (never both)."""
    supplied = copies.gradients()
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is None or p not in supplied, f"{name}: both a .grad and a copy gradient"
        out[name] = p.grad if p.grad is not None else supplied.get(p)
    return out


@pytest.mark.parametrize("batched_modulation", [True, False, "auto"])
@pytest.mark.parametrize("fused_gelu", [True, False])
def test_the_copies_take_the_cast_paths_gradients_in_bf16(batched_modulation, fused_gelu):
    cast, leaves = pair(batched_modulation=batched_modulation, fused_gelu=fused_gelu)
    WeightCopies(cast)
    copies = WeightCopies(leaves, grads=True)
    loss_of(cast, 0).backward()
    loss_of(leaves, 0).backward()
    want = {n: p for n, p in cast.named_parameters() if p.requires_grad}
    got = gradients(leaves, copies)
    bf16 = [n for n, g in got.items() if g is not None and g.dtype == BF16]
    for name, p in want.items():
        assert got[name] is not None, name
        assert torch.equal(got[name].float(), p.grad), f"{name}: max |diff| {(got[name].float() - p.grad).abs().max()}"
    # every Linear/Conv weight but those the batched matmul would read and 'auto' leaves to autocast
    modulation = {f"blocks.{i}.adaLN_modulation.1.weight" for i in range(2)} | {"final_layer.adaLN_modulation.1.weight"}
    weights = {n for n, p in leaves.named_parameters() if n.endswith("weight") and p.dim() >= 2
               and "embedding_table" not in n}
    assert set(bf16) >= weights - (modulation if batched_modulation == "auto" else set())
    if batched_modulation == "auto":
        assert not modulation & set(bf16)  # the torch backend: no batched matmul, the layers read fp32 weights
    assert (CONCAT_WEIGHT_COPY in leaves._buffers) == (batched_modulation is not False)
    copies.clear_gradients()
    assert copies.gradients() == {}


def steps(model, copies, optimizer, seeds):
    norms = []
    for seed in seeds:
        loss_of(model, seed).backward()
        optimizer.step()
        optimizer.zero_grad()
        norms.append(optimizer.last_grad_norm.clone())
    return norms


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipped, unclipped
def test_clipped_adamw_takes_the_cast_paths_steps_from_bf16_gradients(max_norm):
    cast, leaves = pair(batched_modulation=True)
    runs = []
    for model, grads in ((cast, False), (leaves, True)):
        copies = WeightCopies(model, grads=grads)
        optimizer = ClippedAdamW(model.parameters(), max_norm=max_norm, step_kernel="alignflow", lr=1e-2,
                                 weight_decay=0.05)
        optimizer.set_bf16_copies(copies.mapping())
        if grads:
            optimizer.set_gradient_source(copies)
        launched = dict(_launches())
        runs.append((steps(model, copies, optimizer, [11, 12, 13]), optimizer, copies))
        assert _launches()["adamw_step"] > launched.get("adamw_step", 0)  # the kernel ran, not the reference
    (want_norms, want_opt, want_copies), (got_norms, got_opt, got_copies) = runs
    assert torch.equal(torch.stack(got_norms), torch.stack(want_norms))
    assert got_copies.gradients() == {}  # step() drops them
    for (name, p), q in zip(leaves.named_parameters(), cast.parameters()):
        assert torch.equal(p, q), name
        if not p.requires_grad:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got_opt.state[p][key], want_opt.state[q][key]), f"{name} {key}"
    for a, b in zip(got_copies.copies, want_copies.copies):
        assert torch.equal(a, b)


def _launches():
    from kernels import _cuda

    return _cuda.launches


def test_total_norm_of_bf16_gradients_is_the_fp32_norm():
    grads = [torch.randn(s).to(dtype) * 3 for s, dtype in
             (((257, 31), BF16), ((7,), torch.float32), ((1000,), BF16), ((3, 5, 2), torch.float32))]
    want = torch.nn.utils.get_total_norm([g.float() for g in grads], 2.0)
    assert torch.equal(total_norm(grads), want)
    assert total_norm(grads).dtype == torch.float32


def test_a_gradient_source_needs_the_alignflow_kernel_and_one_gradient_a_param():
    model = randomize(tiny_model(batched_modulation=True))
    copies = WeightCopies(model, grads=True)
    with pytest.raises(ValueError, match="step_kernel 'alignflow' only"):
        ClippedAdamW(model.parameters(), max_norm=1.0).set_gradient_source(copies)
    optimizer = ClippedAdamW(model.parameters(), max_norm=1.0, step_kernel="alignflow")
    optimizer.set_gradient_source(copies)
    loss_of_plain(model).backward()
    weight = model.final_layer.linear.weight
    weight.grad = torch.zeros_like(weight)  # as if the fp32 weight were also used outside its copy
    with pytest.raises(ValueError, match=r"has both a \.grad and a gradient from its gradient source"):
        optimizer.step()


def loss_of_plain(model):
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with kernels.use_backend("torch"), torch.autocast("cpu", dtype=BF16):
        velocity, zs = model(x, t, y)
    return velocity.float().square().sum() + sum(z.float().sum() for z in zs)


def test_under_torch_compile_the_copies_take_the_gradients():
    # train.compile: the leaves are buffers that require grad; the compiled backward hands them their
    # gradients in bf16 (Inductor fuses the bf16 ops its own way: within bf16 rounding of eager's)
    torch._dynamo.reset()
    eager, compiled = pair(batched_modulation=True)
    eager_copies, copies = WeightCopies(eager, grads=True), WeightCopies(compiled, grads=True)
    loss_of(eager, 5).backward()
    loss_of(torch.compile(compiled, fullgraph=True), 5).backward()
    want, got = gradients(eager, eager_copies), gradients(compiled, copies)
    assert want.keys() == got.keys() and sum(g.dtype == BF16 for g in got.values()) > 15
    for name, grad in got.items():
        assert grad.dtype == want[name].dtype, name
        assert_close(grad.float(), want[name].float(), dtype=BF16, name=name)
    torch._dynamo.reset()
