"""The SiT block's speed switches (engine.models.sit) against the reference path they replace: the same
loss, every gradient and the weights after a few AdamW steps; bitwise on the torch backend."""
import pytest
import torch

import kernels
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


def _pair(device, **switch_off):
    on = randomize(tiny_model(**SMALL), scale=0.1).to(device)
    off = tiny_model(**SMALL, **switch_off).to(device)
    off.load_state_dict(on.state_dict(), strict=True)
    return on, off


# the kernel path under bf16 autocast (the trainer's bf16-mixed), the torch path in fp32 (the CPU default)
@pytest.mark.parametrize("backend, autocast", [("torch", False), ("triton", True)])
def test_fused_gelu_trains_as_the_reference_mlp(backend, autocast, device):
    on, off = _pair(device, fused_gelu=False)
    assert on.blocks[0].mlp.fc1.fused and not off.blocks[0].mlp.fc1.fused
    batch = _batch(device)
    results = [_train(model, batch, backend, steps=2, autocast=autocast) for model in (on, off)]
    (losses, grads, weights), (ref_losses, ref_grads, ref_weights) = results
    assert grads.keys() == ref_grads.keys() and "blocks.0.mlp.fc1.bias" in grads
    if backend == "torch" and not autocast:  # the CPU default path keeps its numerics bitwise
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


def test_switch_keeps_state_dict_keys_and_is_validated():
    assert tiny_model(fused_gelu=True).state_dict().keys() == tiny_model(fused_gelu=False).state_dict().keys()
    with pytest.raises(ValueError) as info:
        tiny_config(fused_gelu="yes")
    assert str(info.value).startswith("fused_gelu: 'yes': ")
