"""Transport: loss formulas (REPA, REG, CAR-Flow, SiT direction), time samplers, velocity conversions."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from engine.transport import (Transport, TransportConfig, data_from_velocity, noise_from_velocity,
                              score_from_velocity)
from tests.engine.common import randomize, tiny_model
from tests.helpers import assert_close


def coefficients(t, path):
    t = t.view(-1, *([1] * 3)) if t.dim() == 1 else t
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    a = math.pi / 2
    return torch.cos(a * t), torch.sin(a * t), -a * torch.sin(a * t), a * torch.cos(a * t)


def neg_cos(p, q):
    return -(F.normalize(p, dim=-1) * F.normalize(q, dim=-1)).sum(-1).mean()


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_repa_losses_match_hand_computation(path):
    model = randomize(tiny_model(z_dims=[24, 12])).eval()
    x, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.rand(3)
    y, z = torch.tensor([1, 2, 3]), [torch.randn(3, 16, 24), torch.randn(3, 16, 12)]
    transport = Transport(TransportConfig(path=path, proj_coeff=0.7))
    losses = transport.training_losses(model, x, y, z, noise=noise, t=t)

    alpha, sigma, d_alpha, d_sigma = coefficients(t, path)
    with torch.no_grad():
        v_pred, zs = model(alpha * x + sigma * noise, t, y)
    velocity = ((v_pred - (d_alpha * x + d_sigma * noise)) ** 2).mean()
    alignment = (neg_cos(zs[0], z[0]) + neg_cos(zs[1], z[1])) / 2
    assert_close(losses["velocity"], velocity, name="velocity")
    assert_close(losses["alignment"], alignment, name="alignment")
    assert_close(losses["loss"], velocity + 0.7 * alignment, name="loss")
    assert losses["cls"].item() == 0 and set(losses) == {"loss", "velocity", "alignment", "cls"}
    assert all(v.dim() == 0 for v in losses.values())


def test_reversed_time_feeds_one_minus_t_and_negates_the_output():
    model = randomize(tiny_model(z_dims=[])).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    x, noise, t, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([0, 1])
    losses = Transport(TransportConfig(reversed_time=True)).training_losses(model, x, y, noise=noise, t=t)
    torch.testing.assert_close(seen[0], 1 - t)
    with torch.no_grad():
        out = model((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, 1 - t, y)[0]
    # SiT's target x - noise for its own output is REPA's noise - x for the negated output.
    assert_close(losses["velocity"], ((out - (x - noise)) ** 2).mean())
    assert losses["alignment"].item() == 0


def test_reg_class_token_flow_and_alignment_target():
    model = randomize(tiny_model(reg=True)).eval()
    x, noise, t, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([4, 5])
    z, cls, cls_noise = torch.randn(2, 16, 24), torch.randn(2, 24), torch.randn(2, 24)
    transport = Transport(TransportConfig(path="cosine", cls_coeff=0.03))
    losses = transport.training_losses(model, x, y, [z], cls_target=cls, noise=noise, t=t, cls_noise=cls_noise)

    alpha, sigma, d_alpha, d_sigma = coefficients(t, "cosine")
    a2, s2, da2, ds2 = (c.view(-1, 1) for c in coefficients(t, "cosine"))
    with torch.no_grad():
        v_pred, zs, v_cls = model(alpha * x + sigma * noise, t, y, cls_token=a2 * cls + s2 * cls_noise)
    velocity = ((v_pred - (d_alpha * x + d_sigma * noise)) ** 2).mean()
    cls_loss = ((v_cls - (da2 * cls + ds2 * cls_noise)) ** 2).mean()
    alignment = neg_cos(zs[0], torch.cat([cls[:, None], z], dim=1))  # class token prepended to the target
    assert_close(losses["cls"], cls_loss, name="cls")
    assert_close(losses["alignment"], alignment, name="alignment")
    assert_close(losses["loss"], velocity + 0.5 * alignment + 0.03 * cls_loss, name="loss")

    losses["loss"].backward()
    for name in ("cls_projectors2.weight", "wg_norm.weight", "final_layer.linear_cls.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["source", "target", "joint"])
def test_car_flow_shifts_enter_the_path_and_learn_from_the_flow_loss(mode):
    model = randomize(tiny_model(z_dims=[], car_flow=mode, car_flow_rank=8)).eval()
    x, noise, t, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    losses = Transport().training_losses(model, x, y, noise=noise, t=t)
    with torch.no_grad():
        mu0, mu1 = model.car_flow_shifts(y)
        assert (mu0 is not None) == (mode != "target") and (mu1 is not None) == (mode != "source")
        z1 = x + (mu1 if mu1 is not None else 0)
        z0 = noise + (mu0 if mu0 is not None else 0)
        tt = t.view(-1, 1, 1, 1)
        v_pred = model((1 - tt) * z1 + tt * z0, t, y)[0]
        assert_close(losses["velocity"], ((v_pred - (z0 - z1)) ** 2).mean())
    losses["loss"].backward()
    for net in model.shift_nets():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    # The null class has its own shift.
    shifts = [s for s in model.car_flow_shifts(torch.tensor([10, 3])) if s is not None]
    assert all(not torch.allclose(s[0], s[1]) for s in shifts)


def test_one_set_of_dropped_labels_for_shifts_and_model():
    model = randomize(tiny_model(z_dims=[], car_flow="source", class_dropout_prob=0.5)).train()
    seen = {}
    shifts = model.car_flow_shifts
    model.car_flow_shifts = lambda labels: (seen.__setitem__("shift", labels.clone()), shifts(labels))[1]
    model.register_forward_pre_hook(lambda module, args: seen.__setitem__("model", args[2].clone()))
    y = torch.arange(10).repeat(4)
    Transport().training_losses(model, torch.randn(40, 4, 8, 8), y)
    assert torch.equal(seen["shift"], seen["model"]) and (seen["model"] == 10).any()


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_time_samplers(path):
    n = 40000
    generator = torch.Generator().manual_seed(0)
    uniform = Transport(TransportConfig(path=path)).sample_time(n, generator=generator)
    assert uniform.min() >= 0 and uniform.max() <= 1 and abs(uniform.mean().item() - 0.5) < 0.01

    def log_ratio(t):  # log(sigma_t / alpha_t)
        return torch.logit(t.double()) if path == "linear" else torch.log(torch.tan(math.pi / 2 * t.double()))

    for sampling, mean, std, shift in (("lognormal", 0.0, 1.0, 1.0), ("lognormal", -0.4, 1.2, 1.0),
                                       ("shifted_lognormal", 0.0, 1.0, 3.0)):
        cfg = TransportConfig(path=path, time_sampling=sampling, lognormal_mean=mean, lognormal_std=std,
                              time_shift=shift)
        r = log_ratio(Transport(cfg).sample_time(n, generator=generator))
        assert abs(r.mean().item() - (mean + math.log(shift))) < 0.03 and abs(r.std().item() - std) < 0.03
    # REPA's lognormal: sigma = exp(n), t = sigma / (1 + sigma) (linear) or 2/pi atan(sigma) (cosine).
    n_values = torch.randn(100, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    t = Transport(TransportConfig(path=path, time_sampling="lognormal")).sample_time(100, generator=generator)
    sigma = n_values.exp()
    expected = sigma / (1 + sigma) if path == "linear" else 2 / math.pi * torch.atan(sigma)
    torch.testing.assert_close(t, expected)


def test_shifted_lognormal_is_sd3_shift_on_the_linear_path():
    generator = torch.Generator().manual_seed(2)
    base = Transport(TransportConfig(time_sampling="lognormal")).sample_time(1000, generator=generator)
    generator = torch.Generator().manual_seed(2)
    shifted = Transport(TransportConfig(time_sampling="shifted_lognormal", time_shift=3.0)).sample_time(
        1000, generator=generator)
    torch.testing.assert_close(shifted, 3 * base / (1 + 2 * base))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_velocity_conversions(path):
    x, noise, mu0, mu1 = (torch.randn(3, 4, 4, 4, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = coefficients(t, path)
    z1, z0 = x + mu1, noise + mu0
    x_t, v = alpha * z1 + sigma * z0, d_alpha * z1 + d_sigma * z0
    torch.testing.assert_close(noise_from_velocity(v, x_t, t, path, mu0), noise)
    torch.testing.assert_close(data_from_velocity(v, x_t, t, path, mu1), x)
    torch.testing.assert_close(score_from_velocity(v, x_t, t, path, mu0), -noise / sigma)
    # Without shifts: REPA's get_score_from_velocity.
    x_t, v = alpha * x + sigma * noise, d_alpha * x + d_sigma * noise
    ratio = alpha / d_alpha
    repa = (ratio * v - x_t) / (sigma ** 2 - ratio * d_sigma * sigma)
    torch.testing.assert_close(score_from_velocity(v, x_t, t, path), repa)


def test_transport_errors():
    model = tiny_model(z_dims=[24])
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="1 projectors"):
        Transport().training_losses(model, x, y, [])
    with pytest.raises(ValueError, match="does not match the target"):
        Transport().training_losses(model, x, y, [torch.randn(2, 9, 24)])
    with pytest.raises(ValueError, match="cls_target"):
        Transport().training_losses(tiny_model(reg=True), x, y, [torch.randn(2, 16, 24)])
    for key, value in (("path", "edm"), ("time_sampling", "beta"), ("prediction", "eps"), ("time_shift", 0.0)):
        with pytest.raises(ValueError, match=key) as info:
            TransportConfig(**{key: value})
        assert repr(value) in str(info.value)


def test_transport_uses_the_kernel_ops(monkeypatch):
    calls = []
    for name in ("interpolant", "velocity_loss", "alignment_loss"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    model = tiny_model(reg=True)
    Transport().training_losses(model, torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), [torch.randn(2, 16, 24)],
                                cls_target=torch.randn(2, 24))
    assert sorted(calls) == ["alignment_loss", "interpolant", "interpolant", "velocity_loss", "velocity_loss"]


def test_wrapped_models_are_unwrapped_for_their_methods():
    from engine.transport import unwrap

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = tiny_model(car_flow="source")
    wrapped = Wrapper(Wrapper(model))
    assert unwrap(wrapped) is model and unwrap(model) is model
    losses = Transport().training_losses(wrapped, torch.randn(2, 4, 8, 8), torch.tensor([0, 1]),
                                         [torch.randn(2, 16, 24)])
    assert torch.isfinite(losses["loss"])
