"""model.mlp_kernel: "triton" (the MLP as one op, kernels.mlp_gelu) against "torch" (nn.Linear +
kernels.gelu_tanh + nn.Linear): the same loss, every gradient and the weights after two optimizer steps
(CPU: Triton interpreter), with and without bf16 autocast, fc2's bias handed on, and the bf16 weight
copies (train.bf16_weight_copies)."""
import copy

import pytest
import torch

import kernels
from engine.bf16_copies import WeightCopies
from engine.models import sit
from tests.engine.common import randomize, tiny_config, tiny_model
from tests.engine.test_sit_blocks import _batch, _pair, _train
from tests.helpers import assert_close


def _count_fused_calls(monkeypatch):
    calls = []
    original = kernels.mlp_gelu
    monkeypatch.setattr(kernels, "mlp_gelu", lambda *args: calls.append(1) or original(*args))
    return calls


def _assert_trains_alike(ours, reference, dtype):
    (losses, grads, weights), (ref_losses, ref_grads, ref_weights) = ours, reference
    for a, b in zip(losses, ref_losses, strict=True):
        assert_close(a, b, dtype, name="loss")
    assert grads.keys() == ref_grads.keys() and {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
                                                 "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias"} <= grads.keys()
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, dtype, name=name)
    for name, weight in ref_weights.items():
        assert_close(weights[name], weight, dtype, name=name)


def _train_steps(model, batch, autocast, copies):
    """Two optimizer steps: _train's, or with bf16 weight copies one step at a time, the copies
    refreshed from the weights before each (as the trainer refreshes them after each update)."""
    if not copies:
        return [_train(model, batch, "triton", steps=2, autocast=autocast)]
    weight_copies, results = WeightCopies(model), []
    for _ in range(2):
        weight_copies.refresh()
        results.append(_train(model, batch, "triton", steps=1, autocast=autocast))
    return results


@pytest.mark.parametrize("autocast, fused_bias_grad, copies", [
    (False, False, False), (False, True, False), (True, False, False), (True, True, False), (True, True, True)])
def test_triton_mlp_trains_as_the_torch_mlp(autocast, fused_bias_grad, copies, device, monkeypatch):
    ours, reference = _pair(device, dict(mlp_kernel="triton", fused_bias_grad=fused_bias_grad),
                            dict(mlp_kernel="torch", fused_bias_grad=fused_bias_grad))
    batch = _batch(device)
    calls = _count_fused_calls(monkeypatch)
    trained = _train_steps(ours, batch, autocast, copies)
    assert calls, "the triton MLP did not run kernels.mlp_gelu"
    calls.clear()
    expected = _train_steps(reference, batch, autocast, copies)
    assert not calls
    for got, want in zip(trained, expected, strict=True):
        _assert_trains_alike(got, want, torch.bfloat16 if autocast else torch.float32)


def test_zero3_parameters_take_the_per_layer_path(monkeypatch):
    """ZeRO-3 gathers a module's own parameters around its forward: a partitioned fc1/fc2 (a `ds_id`
    attribute) runs through fc1's and fc2's own forwards, with the same output."""
    mlp = sit.Mlp(16, 64, kernel="triton")
    reference = copy.deepcopy(mlp)
    reference.kernel = "torch"
    calls = _count_fused_calls(monkeypatch)
    x = torch.randn(2, 3, 16)
    with kernels.use_backend("triton"):
        fused, _ = mlp(x)
        assert calls
        calls.clear()
        mlp.fc1.weight.ds_id = 1
        per_layer, _ = mlp(x)
        expected, _ = reference(x)
    assert not calls
    assert torch.equal(per_layer, expected)
    assert_close(fused, expected, torch.float32, name="fused")


def test_mlp_kernel_is_validated_and_keeps_the_state_dict_keys():
    on, off = tiny_model(mlp_kernel="triton"), tiny_model(mlp_kernel="torch")
    assert on.state_dict().keys() == off.state_dict().keys()
    assert tiny_config().mlp_kernel == "torch"  # opt-in: no GPU measurement yet
    with pytest.raises(ValueError) as info:
        tiny_config(mlp_kernel="cublas")
    assert str(info.value).startswith("mlp_kernel: 'cublas': ") and "torch, triton" in str(info.value)


def test_triton_mlp_compiles_to_one_graph_with_eagers_numbers():
    """train.compile with model.mlp_kernel: triton: SiT's fused MLP path (its autocast cast, the custom op)
    traces into one graph (fullgraph) whose outputs and gradients are the eager model's, under bf16
    autocast as the trainer runs it."""
    torch._dynamo.reset()
    model = randomize(tiny_model(mlp_kernel="triton", z_dims=[8], hidden_size=32, num_heads=2, input_size=4,
                                 depth=1, encoder_depth=1, projector_dim=16), scale=0.1)
    inputs = (torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 7]))
    seeds = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8)]

    def step(forward):
        with kernels.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
            velocity, zs = forward(*inputs)
        loss = sum((o.float() * s).sum() for o, s in zip([velocity, *zs], seeds))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        return [velocity, *zs], {n: g for (n, _), g in zip(named, grads) if g is not None}

    got_outputs, got_grads = step(torch.compile(model, fullgraph=True))
    want_outputs, want_grads = step(model)
    for i, (a, e) in enumerate(zip(got_outputs, want_outputs)):
        assert_close(a, e, dtype=torch.bfloat16, name=f"output {i}")
    assert got_grads.keys() == want_grads.keys() and "blocks.0.mlp.fc1.bias" in got_grads
    for name, grad in got_grads.items():
        assert_close(grad, want_grads[name], dtype=torch.bfloat16, name=f"grad {name}")
    torch._dynamo.reset()
