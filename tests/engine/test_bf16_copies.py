"""bf16 weight copies (engine/bf16_copies.py, train.bf16_weight_copies): the matmuls read a persistent bf16
copy of each weight instead of autocast's cast, with autocast's numbers bit for bit (forward and every
gradient), on the CPU's bf16 autocast."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from engine.bf16_copies import BIAS_COPY, CONCAT_WEIGHT_COPY, WEIGHT_COPY, CopyIsCast, WeightCopies
from engine.models.sit import LinearGELU
from tests.engine.common import randomize, tiny_model
from tests.helpers import poisoned_empty

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _torch_linear(monkeypatch):
    # a ZeRO-3 engine built earlier in this process leaves DeepSpeed's own torch.nn.functional.linear in
    # place (it adds an fp32 bias to the bf16 matmul where autocast would cast it): compare torch's
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def grads(output, tensors, seed_grad):
    return torch.autograd.grad(output, tensors, seed_grad, allow_unused=True)


def assert_equal(actual, expected, name):
    assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} != {expected.dtype}"
    assert torch.equal(actual, expected), f"{name}: max |diff| {(actual.float() - expected.float()).abs().max()}"


@pytest.mark.parametrize("input_dtype", [torch.float32, BF16])
@pytest.mark.parametrize("shape", [(3, 72), (2, 5, 72), (1, 72)])
def test_copy_as_cast_linear_matches_autocast(input_dtype, shape):
    w = torch.randn(40, 72, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    x = torch.randn(shape).to(input_dtype).requires_grad_()
    with poisoned_empty():
        w16, b16 = torch.empty(40, 72, dtype=BF16), torch.empty(40, dtype=BF16)
    torch._foreach_copy_([w16, b16], [w.detach(), b.detach()])
    with autocast():
        expected = F.linear(x, w, b)
        actual = F.linear(x, CopyIsCast.apply(w, w16), CopyIsCast.apply(b, b16))
    assert_equal(actual, expected, "output")
    seed_grad = torch.randn(expected.shape).to(expected.dtype)
    for name, a, e in zip(("x", "weight", "bias"), grads(actual, (x, w, b), seed_grad),
                          grads(expected, (x, w, b), seed_grad)):
        assert_equal(a, e, f"grad {name}")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("input_dtype", [torch.float32, BF16])
def test_linear_gelu_reads_its_copies(fused, input_dtype):
    layer = LinearGELU(72, 96, fused=fused)
    randomize(layer)
    reference = copy.deepcopy(layer)
    copies = WeightCopies(layer)
    assert set(layer._buffers) == {WEIGHT_COPY, BIAS_COPY} and "forward" not in layer.__dict__
    x = torch.randn(2, 5, 72).to(input_dtype)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    with kernels.use_backend("torch"), autocast():
        expected, actual = reference(x_ref), layer(x)
    assert_equal(actual, expected, "output")
    seed_grad = torch.randn(expected.shape).to(expected.dtype)
    got = grads(actual, (x, layer.weight, layer.bias), seed_grad)
    want = grads(expected, (x_ref, reference.weight, reference.bias), seed_grad)
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        assert_equal(a, e, f"grad {name}")
    assert copies.numel() == 72 * 96 + 96
    layer.weight_bf16.zero_()  # the layer computes with its copies, not with its parameters
    with kernels.use_backend("torch"), autocast():
        assert torch.equal(layer(x), F.gelu(layer.bias.to(BF16).expand_as(expected), approximate="tanh"))


def sit_pair(**options):
    reference = randomize(tiny_model(reg=True, car_flow="joint", z_dims=[24, 16], **options))
    model = copy.deepcopy(reference)
    return reference, model


def sit_step(model, inputs, seed_grads):
    x, t, y, cls = inputs
    with autocast():
        velocity, zs, cls_velocity = model(x, t, y, cls)
        mu0, mu1 = model.car_flow_shifts(y)
    outputs = [velocity, *zs, cls_velocity, mu0, mu1]
    loss = sum((o.float() * g).sum() for o, g in zip(outputs, seed_grads))
    params = [p for p in model.parameters() if p.requires_grad]
    return outputs, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("batched_modulation, fused_gelu, fused_bias_grad",
                         [(False, True, "auto"), (True, True, "auto"), (False, False, "auto"), (True, False, "auto"),
                          (True, True, True)])
def test_sit_with_copies_is_autocast_bitwise(batched_modulation, fused_gelu, fused_bias_grad):
    # Every Linear of the model (blocks, modulations, final layer, projectors, embedders, REG, CAR-Flow)
    # and the patch embedding read their copies; outputs and every parameter's gradient are autocast's.
    # With model.fused_bias_grad attn.proj and mlp.fc2 read their weight copies and hand on the fp32 bias.
    reference, model = sit_pair(batched_modulation=batched_modulation, fused_gelu=fused_gelu,
                                fused_bias_grad=fused_bias_grad)
    with poisoned_empty():
        copies = WeightCopies(model)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert all(WEIGHT_COPY in m._buffers for m in linears) and len(copies.params) == 2 * len(linears)
    assert CONCAT_WEIGHT_COPY in model._buffers
    assert model.state_dict().keys() == reference.state_dict().keys()  # non-persistent: REPA's keys
    inputs = (torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10]), torch.randn(3, 24))
    shapes = [(3, 4, 8, 8), (3, 17, 24), (3, 17, 16), (3, 24), (3, 4, 8, 8), (3, 4, 8, 8)]
    seed_grads = [torch.randn(s) for s in shapes]
    with kernels.use_backend("torch"):
        want_out, want_grads = sit_step(reference, inputs, seed_grads)
        got_out, got_grads = sit_step(model, inputs, seed_grads)
    for i, (a, e) in enumerate(zip(got_out, want_out)):
        assert_equal(a, e, f"output {i}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, e in zip(names, got_grads, want_grads):
        assert_equal(a, e, f"grad {name}")
    for c in copies.copies:  # the model computes with the copies, not with its parameters
        c.zero_()
    with kernels.use_backend("torch"):
        zeroed, _ = sit_step(model, inputs, seed_grads)
    assert not zeroed[0].any() and want_out[0].abs().sum() > 0


def test_batched_modulation_reads_the_concatenated_copy_without_copying():
    _, model = sit_pair(batched_modulation=True)
    WeightCopies(model)
    layers = model.modulation_layers()
    buffer = model._buffers[CONCAT_WEIGHT_COPY]
    assert all(layer._buffers[WEIGHT_COPY].data_ptr() == rows.data_ptr()
               for layer, rows in zip(layers, buffer.split([l.weight.shape[0] for l in layers])))
    copies = []
    real_copy = torch.Tensor.copy_

    def counting_copy(self, src, *args, **kwargs):
        copies.append(tuple(self.shape))
        return real_copy(self, src, *args, **kwargs)

    torch.Tensor.copy_ = counting_copy
    try:
        with kernels.use_backend("torch"), autocast():
            model.modulations(torch.randn(2, model.cfg.hidden_size))
    finally:
        torch.Tensor.copy_ = real_copy
    assert copies == []


def test_refresh_follows_the_parameters_and_strict_loads_still_work():
    reference, model = sit_pair()
    copies = WeightCopies(model)
    for c in copies.copies:
        c.fill_(float("nan"))
    randomize(model)  # an optimizer step, a checkpoint load
    copies.refresh()
    for p, c in copies.mapping().items():
        assert_equal(c, p.detach().to(BF16), "copy")
    model.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(model.state_dict(), strict=True)
    copies.refresh()
    assert all(torch.equal(c, p.detach().to(BF16)) for p, c in copies.mapping().items())


def test_copies_are_unused_outside_bf16_autocast():
    # fp32 (no autocast), and an fp16 autocast: the layer computes as before, with its parameters.
    layer = nn.Linear(16, 8)
    reference = copy.deepcopy(layer)
    WeightCopies(layer)
    layer.weight_bf16.fill_(float("nan"))
    layer.bias_bf16.fill_(float("nan"))
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), reference(x))
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(layer(x), reference(x))
