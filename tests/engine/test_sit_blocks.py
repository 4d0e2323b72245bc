"""The SiT block's speed switches (engine.models.sit) against the reference path they replace: the same
loss, every gradient and the weights after a few optimizer steps; bitwise where the switch keeps the torch
backend's fp32 path."""
import types

import pytest
import torch

import kernels
from engine.models import sit
from engine.transport import Transport, TransportConfig
from tests.engine.common import randomize, tiny_config, tiny_model
from tests.helpers import assert_close

SMALL = dict(depth=1, encoder_depth=1, hidden_size=32, num_heads=2, input_size=4, z_dims=[8], projector_dim=16)


def _batch(device):
    return tuple(t.to(device) for t in (torch.randn(2, 4, 4, 4), torch.tensor([1, 7]), torch.randn(2, 4, 8),
                                         torch.randn(2, 4, 4, 4), torch.rand(2)))


def _train(model, batch, backend, steps, autocast=False):
    """(losses of each step, the gradients of the first, the weights after `steps` optimizer steps). SGD
    with momentum, not AdamW: Adam's normalised step turns rounding noise in a gradient that is zero in
    exact arithmetic (attention's key bias) into an lr-sized change, which would say nothing about the
    switch."""
    x, y, z, noise, t = batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    losses, first = [], None
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)  # the same label dropout for both models
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with kernels.use_backend(backend), torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            loss = Transport(TransportConfig()).training_losses(model, x, y, [z], noise=noise, t=t)["loss"]
        loss.backward()
        if first is None:
            first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        losses.append(loss.detach())
    torch.set_rng_state(generator_state)
    return losses, first, {n: p.detach().clone() for n, p in model.named_parameters()}


def _pair(device, on, off):
    first = randomize(tiny_model(**SMALL, **on), scale=0.1).to(device)
    second = tiny_model(**SMALL, **off).to(device)
    second.load_state_dict(first.state_dict(), strict=True)
    return first, second


def _batched_calls(monkeypatch):
    calls = []
    original = sit._CastConcat.apply
    monkeypatch.setattr(sit._CastConcat, "apply", lambda *args: calls.append(1) or original(*args))
    return calls


def _handed_on_biases(monkeypatch):
    """Records, per call of attn.proj / mlp.fc2, whether it handed its bias on to the adaLN kernel."""
    calls = []
    original = sit.LinearBiasHandedOn.forward

    def forward(self, x):
        out, bias = original(self, x)
        calls.append(bias is not None)
        return out, bias
    monkeypatch.setattr(sit.LinearBiasHandedOn, "forward", forward)
    return calls


# Each switch on against off: the kernel path under bf16 autocast (the trainer's bf16-mixed), the torch
# path in fp32 (the CPU default). bitwise: the switch leaves the torch fp32 path as it was.
CASES = [
    (dict(fused_gelu=True), dict(fused_gelu=False), "torch", False, True),
    (dict(fused_gelu=True), dict(fused_gelu=False), "triton", True, False),
    (dict(batched_modulation="auto"), dict(batched_modulation=False), "torch", False, True),
    (dict(batched_modulation=True), dict(batched_modulation=False), "torch", False, False),
    (dict(batched_modulation="auto"), dict(batched_modulation=False), "triton", True, False),
    (dict(fused_bias_grad="auto"), dict(fused_bias_grad=False), "torch", False, True),  # auto: off on the CPU
    (dict(fused_bias_grad="auto"), dict(fused_bias_grad=False), "triton", False, True),
    (dict(fused_bias_grad=True), dict(fused_bias_grad=False), "torch", False, False),
    (dict(fused_bias_grad=True), dict(fused_bias_grad=False), "triton", False, False),
    (dict(fused_bias_grad=True), dict(fused_bias_grad=False), "triton", True, False),
]


@pytest.mark.parametrize("on, off, backend, autocast, bitwise", CASES)
def test_switch_trains_as_the_reference_path(on, off, backend, autocast, bitwise, device, monkeypatch):
    first, second = _pair(device, on, off)
    batch = _batch(device)
    calls = _batched_calls(monkeypatch)
    handed_on = _handed_on_biases(monkeypatch)

    def batches(switches):  # "auto" batches only where autocast casts the fp32 weights, with the kernels
        mode = switches.get("batched_modulation", "auto")
        return mode is True or (mode == "auto" and autocast and backend != "torch")

    def hands_on(switches):  # "auto": only on CUDA, so never here
        return switches.get("fused_bias_grad", "auto") is True

    losses, grads, weights = _train(first, batch, backend, steps=2, autocast=autocast)
    assert bool(calls) == batches(on)
    assert handed_on and set(handed_on) == {hands_on(on)}
    calls.clear()
    handed_on.clear()
    ref_losses, ref_grads, ref_weights = _train(second, batch, backend, steps=2, autocast=autocast)
    assert bool(calls) == batches(off)
    assert handed_on and set(handed_on) == {hands_on(off)}
    assert grads.keys() == ref_grads.keys() and {"blocks.0.mlp.fc1.bias", "blocks.0.adaLN_modulation.1.weight",
                                                 "final_layer.adaLN_modulation.1.bias", "blocks.0.attn.proj.bias",
                                                 "blocks.0.mlp.fc2.bias"} <= grads.keys()
    if bitwise:
        assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
        assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
        assert all(torch.equal(weights[n], w) for n, w in ref_weights.items())
        return
    dtype = torch.bfloat16 if autocast else torch.float32
    for a, b in zip(losses, ref_losses):
        assert_close(a, b, dtype, name="loss")
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, dtype, scale=max(1.0, float(grad.abs().max())), name=name)
    for name, weight in ref_weights.items():
        assert_close(weights[name], weight, dtype, name=name)


def test_batched_modulation_gives_every_module_its_own_chunks():
    """The one matmul's output split as each module's own: shift/scale/gate per block, the final layer's
    shift and scale; ZeRO-3-partitioned weights (a `ds_id` attribute) take the per-module path."""
    model = randomize(tiny_model(depth=3, batched_modulation=True), scale=0.3)
    c = torch.randn(2, 32)
    batched = model.modulations(c)
    model.cfg.batched_modulation = False
    expected = model.modulations(c)
    assert [len(m) for m in batched] == [6, 6, 6, 2]
    for got, want in zip(batched, expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    model.cfg.batched_modulation = True
    layers = [block.adaLN_modulation[-1] for block in model.blocks] + [model.final_layer.adaLN_modulation[-1]]
    assert model._batched_modulation_dtype(c, layers) == torch.float32
    layers[1].weight.ds_id = 7
    assert model._batched_modulation_dtype(c, layers) is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_block_on_its_own_with_fused_bias_grad(backend):
    """SiTBlock.forward (outside the model's fused chain: its MLP residual is a plain add) with the
    biases handed on against nn.Linear's own: output and every parameter gradient, fp32."""
    torch.manual_seed(0)
    on, off = (sit.SiTBlock(32, 2, fused_bias_grad=mode) for mode in (True, False))
    off.load_state_dict(randomize(on, scale=0.3).state_dict(), strict=True)
    x, c, grad = torch.randn(2, 5, 32), torch.randn(2, 32), torch.randn(2, 5, 32)
    results = []
    for block in (on, off):
        with kernels.use_backend(backend):
            out = block(x, c)
            out.backward(grad)
        results.append((out.detach(), {n: p.grad.clone() for n, p in block.named_parameters()}))
    assert_close(results[0][0], results[1][0], torch.float32, name="block output")
    assert results[0][1].keys() == results[1][1].keys() and "attn.proj.bias" in results[0][1]
    for name, g in results[1][1].items():
        assert_close(results[0][1][name], g, torch.float32, name=name)


def test_fused_bias_grad_auto_is_on_only_on_cuda_with_triton():
    layer = sit.LinearBiasHandedOn(4, 4)
    on_cuda, on_cpu = (types.SimpleNamespace(device=torch.device(d)) for d in ("cuda", "cpu"))
    for backend, expected in (("triton", True), ("cuda", False), ("torch", False)):
        with kernels.use_backend(backend):
            assert layer.hands_on_bias(on_cuda) is expected, backend
            assert layer.hands_on_bias(on_cpu) is False, backend
    layer.fused_bias_grad = True
    assert layer.hands_on_bias(on_cpu) is True


@pytest.mark.parametrize("key, bad", [("fused_gelu", "yes"), ("batched_modulation", "always"),
                                      ("batched_modulation", 1), ("fused_bias_grad", "on"),
                                      ("fused_bias_grad", 0)])
def test_switch_keeps_state_dict_keys_and_is_validated(key, bad):
    on, off = (tiny_model(fused_gelu=v, batched_modulation=v, fused_bias_grad=v) for v in (True, False))
    assert on.state_dict().keys() == off.state_dict().keys()
    with pytest.raises(ValueError) as info:
        tiny_config(**{key: bad})
    assert str(info.value).startswith(f"{key}: {bad!r}: ")


def test_zero3_bias_is_handed_on_as_a_copy():
    """A ZeRO-3 parameter (a `ds_id` attribute) is released after its module's forward: the kernel gets
    a copy made inside the forward, whose gradient still reaches the parameter."""
    layer = sit.LinearBiasHandedOn(4, 3, fused_bias_grad=True)
    x = torch.randn(2, 4)
    out, bias = layer(x)
    assert bias is layer.bias
    torch.testing.assert_close(out, x @ layer.weight.T, rtol=0, atol=0)
    layer.bias.ds_id = 3
    out, bias = layer(x)
    assert bias is not layer.bias and bias.data_ptr() != layer.bias.data_ptr()
    torch.testing.assert_close(bias, layer.bias, rtol=0, atol=0)
    (bias * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.arange(3.0), rtol=0, atol=0)
