"""EMA against the reference update on plain fp32 modules (the sharded ZeRO-2 / ZeRO-3 cases run in
test_train_distributed.py, against a reference built from the gathered fp32 master weights)."""
import pytest
import torch
import torch.nn as nn

from engine.ema import EMA, reference_ema


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.frozen = nn.Parameter(torch.randn(3, 7), requires_grad=False)
        self.b = nn.Linear(7, 2)
        self.register_buffer("stat", torch.randn(2))


def test_ema_matches_reference_update():
    net = Net()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    decay = 0.8
    ema = EMA(net, decay, initial)
    reference = {k: v.double() for k, v in initial.items()}
    for _ in range(6):
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        ema.update()
        reference = reference_ema(reference, [(n, p.double()) for n, p in net.named_parameters() if p.requires_grad],
                                  decay)
    state = ema.full_state_dict()
    assert list(state) == list(net.state_dict())  # the model's own key order (REPA layout)
    for key, value in state.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference[key], rtol=0, atol=1e-6)
    # frozen parameters and buffers keep their initial values; trainable ones moved away from them
    torch.testing.assert_close(state["frozen"], initial["frozen"], rtol=0, atol=0)
    torch.testing.assert_close(state["stat"], initial["stat"], rtol=0, atol=0)
    assert (state["a.weight"] - initial["a.weight"]).abs().max() > 0.1


def test_ema_decay_zero_tracks_and_override():
    net = Net()
    ema = EMA(net, 0.0, net.state_dict())
    with torch.no_grad():
        net.a.weight.mul_(3)
    ema.update()
    torch.testing.assert_close(ema.full_state_dict()["a.weight"], net.a.weight.detach(), rtol=0, atol=0)
    before = ema.full_state_dict()["b.bias"].clone()
    with torch.no_grad():
        net.b.bias.add_(1.0)
    ema.update(decay=0.999999)  # a per-call decay: nearly frozen
    assert (ema.full_state_dict()["b.bias"] - before).abs().max() < 1e-5


def test_ema_state_round_trip():
    net = Net()
    ema = EMA(net, 0.5, net.state_dict())
    with torch.no_grad():
        net.a.weight.add_(1.0)
    ema.update()
    saved = ema.full_state_dict()
    other = EMA(net, 0.5, net.state_dict())
    other.load_full_state_dict(saved)
    for key, value in other.full_state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    with pytest.raises(KeyError, match="a.weight"):
        other.load_full_state_dict({k: v for k, v in saved.items() if k != "a.weight"})


def test_ema_rejects_low_precision_without_master_weights():
    net = Net().to(torch.bfloat16)
    with pytest.raises(TypeError, match="fp32 master"):
        EMA(net, 0.9, net.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(Net(), 1.5, {})
