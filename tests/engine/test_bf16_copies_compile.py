"""bf16 weight copies under torch.compile (train.bf16_weight_copies is 'auto' with train.compile on a GPU):
the layers' instance forwards and CopyIsCast trace into one graph, whose outputs and gradients are the
eager autocast model's within bf16 rounding (Inductor fuses the bf16 ops of either model its own way)."""
import copy

import torch

import kernels
from engine.bf16_copies import WeightCopies
from tests.engine.common import randomize, tiny_model
from tests.helpers import assert_close


def test_sit_with_copies_compiles_to_one_graph_with_autocasts_numbers(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)  # see test_bf16_copies.py
    torch._dynamo.reset()
    reference = randomize(tiny_model(reg=True, z_dims=[24]))
    model = copy.deepcopy(reference)
    WeightCopies(model)
    inputs = (torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 9]), torch.randn(3, 24))
    seeds = [torch.randn(3, 4, 8, 8), torch.randn(3, 17, 24), torch.randn(3, 24)]

    def step(module, forward):
        with kernels.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
            velocity, zs, cls_velocity = forward(*inputs)
        outputs = [velocity, *zs, cls_velocity]
        loss = sum((o.float() * s).sum() for o, s in zip(outputs, seeds))
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        return outputs, {n: g for (n, _), g in zip(named, grads) if g is not None}

    got_outputs, got_grads = step(model, torch.compile(model, fullgraph=True))
    want_outputs, want_grads = step(reference, reference)
    for i, (a, e) in enumerate(zip(got_outputs, want_outputs)):
        assert_close(a, e, dtype=torch.bfloat16, name=f"output {i}")
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 20
    for name, grad in got_grads.items():
        assert_close(grad, want_grads[name], dtype=torch.bfloat16, name=f"grad {name}")
    torch._dynamo.reset()
