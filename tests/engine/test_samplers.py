"""Samplers: exactness on analytic flows, SDE statistics, CFG and its interval, CAR-Flow, REG, seeds."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from engine.samplers import sample
from engine.transport import TransportConfig
from tests.engine.common import randomize, tiny_model

NULL = 3  # mock models have classes 0..2 and the null class 3


class GaussianFlow(nn.Module):
    """Exact velocity of the linear path for data z1 ~ N(mean[y] + mu1[y], std^2) per element and source
    z0 ~ N(mu0[y], 1): v = E[z0 | x_t] - E[z1 | x_t]. std = 0 is a point mass."""

    def __init__(self, mean, std, mu0=None, mu1=None, reversed_time=False, shape=(2, 4, 4)):
        super().__init__()
        self.mean, self.std = mean, std
        self.mu0 = mu0 if mu0 is not None else torch.zeros_like(mean)
        self.mu1 = mu1 if mu1 is not None else torch.zeros_like(mean)
        self.has_shifts = mu0 is not None or mu1 is not None
        self.reversed_time = reversed_time
        self.reg = False
        self.null_class = NULL
        self.cfg = SimpleNamespace(in_channels=shape[0], input_size=shape[1])
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.times = []

    def car_flow_shifts(self, y):
        if not self.has_shifts:
            return None, None
        return self.mu0[y], self.mu1[y]

    def forward(self, x, t, y):
        self.times.append(t.clone())
        t = (1 - t) if self.reversed_time else t
        t = t.view(-1, 1, 1, 1).double()
        x = x.double()
        m1, m0 = self.mean[y] + self.mu1[y], self.mu0[y]
        mean_t = (1 - t) * m1 + t * m0
        var = (1 - t) ** 2 * self.std ** 2 + t ** 2
        z1 = m1 + (1 - t) * self.std ** 2 / var * (x - mean_t)
        z0 = m0 + t / var * (x - mean_t)
        v = z0 - z1
        return (-v if self.reversed_time else v), []


class ConstantVelocity(nn.Module):
    """v = cond[y] for real classes, uncond for the null class (same for the REG token)."""

    def __init__(self, cond, uncond, reg=False):
        super().__init__()
        self.cond, self.uncond, self.reg = cond, uncond, reg
        self.cls_dim = 2
        self.null_class = NULL
        self.cfg = SimpleNamespace(in_channels=cond.shape[1], input_size=cond.shape[2])
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.batch_sizes = []

    def forward(self, x, t, y, cls_token=None):
        self.batch_sizes.append(x.shape[0])
        is_null = (y == NULL).view(-1, 1, 1, 1)
        v = torch.where(is_null, self.uncond.expand_as(x), self.cond[y.clamp(max=NULL - 1)])
        if not self.reg:
            return v, []
        v_cls = torch.where(is_null.view(-1, 1), torch.full_like(cls_token, -1.0), torch.full_like(cls_token, 2.0))
        return v, [], v_cls


def point_targets():
    return torch.randn(NULL + 1, 2, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("reversed_time", [False, True])
def test_ode_reaches_a_point_target_exactly_with_car_flow_shifts(method, reversed_time):
    mean, mu0, mu1 = point_targets(), point_targets(), point_targets()
    model = GaussianFlow(mean, 0.0, mu0, mu1, reversed_time=reversed_time)
    y = torch.tensor([0, 2, 1])
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    # The SiT direction comes from the transport config (or the reversed_time argument).
    out = sample(model, y, num_steps=7, method=method, noise=noise,
                 transport_cfg=TransportConfig(reversed_time=reversed_time))
    torch.testing.assert_close(out, mean[y].float(), atol=1e-5, rtol=1e-5)
    expected_t = torch.linspace(1, 0, 8, dtype=torch.float64)[:-1]
    first_times = torch.stack([t[0] for t in model.times[:: (2 if method == "heun" else 1)]])[:7]
    torch.testing.assert_close(first_times, 1 - expected_t if reversed_time else expected_t)


@pytest.mark.parametrize("method", ["euler_maruyama", "euler"])
@pytest.mark.parametrize("shifted", [False, True])
def test_samples_follow_the_data_distribution(method, shifted):
    mean = torch.tensor([0.7, -1.0, 0.0, 2.0], dtype=torch.float64).view(4, 1, 1, 1).expand(4, 1, 1, 1).clone()
    mu0 = torch.tensor([1.5, -2.0, 0.5, 0.0], dtype=torch.float64).view(4, 1, 1, 1) if shifted else None
    mu1 = torch.tensor([-1.0, 3.0, 0.2, 0.0], dtype=torch.float64).view(4, 1, 1, 1) if shifted else None
    model = GaussianFlow(mean, 0.5, mu0, mu1, shape=(1, 64, 64))
    y = torch.tensor([0, 1])
    out = sample(model, y, num_steps=60, method=method, seed=3)  # (2, 1, 64, 64): 4096 draws per class
    for i in range(2):
        assert abs(out[i].mean().item() - mean[y[i]].item()) < 0.05
        assert abs(out[i].std().item() - 0.5) < 0.05


def test_classifier_free_guidance_and_interval():
    cond, uncond = torch.randn(NULL, 2, 4, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64)
    y, noise = torch.tensor([0, 2]), torch.randn(2, 2, 4, 4, dtype=torch.float64)
    guided = uncond + 4.0 * (cond[y] - uncond)

    model = ConstantVelocity(cond, uncond)
    out = sample(model, y, num_steps=10, cfg_scale=4.0, noise=noise)
    torch.testing.assert_close(out, (noise - guided).float())
    assert model.batch_sizes == [4] * 10  # conditional and null halves in one batch

    model = ConstantVelocity(cond, uncond)
    out = sample(model, y, num_steps=10, cfg_scale=4.0, guidance_interval=(0.25, 0.65), noise=noise)
    # Guided at t = 0.6, 0.5, 0.4, 0.3 only: 4 of 10 steps of size 0.1.
    torch.testing.assert_close(out, (noise - 0.4 * guided - 0.6 * cond[y]).float())
    assert model.batch_sizes == [2] * 4 + [4] * 4 + [2] * 2

    model = ConstantVelocity(cond, uncond)
    torch.testing.assert_close(sample(model, y, num_steps=5, cfg_scale=1.0, noise=noise), (noise - cond[y]).float())
    assert model.batch_sizes == [2] * 5

    # Legacy DiT/SiT mode: only the first three channels are guided.
    cond3, uncond3 = torch.randn(NULL, 4, 2, 2, dtype=torch.float64), torch.randn(1, 4, 2, 2, dtype=torch.float64)
    noise4 = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    out = sample(ConstantVelocity(cond3, uncond3), y, num_steps=4, cfg_scale=2.0, legacy_cfg=True, noise=noise4)
    guided3 = uncond3 + 2.0 * (cond3[y] - uncond3)
    torch.testing.assert_close(out[:, :3], (noise4 - guided3)[:, :3].float())
    torch.testing.assert_close(out[:, 3:], (noise4 - cond3[y])[:, 3:].float())


def test_reg_class_token_is_sampled_with_its_own_guidance_scale():
    cond, uncond = torch.randn(NULL, 2, 4, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64)
    y, noise, cls_noise = torch.tensor([1, 2]), torch.randn(2, 2, 4, 4), torch.randn(2, 2, dtype=torch.float64)
    for cls_scale, expected_v in ((3.0, -1 + 3.0 * (2 - -1)), (0.0, 2.0), (None, -1 + 1.5 * 3)):
        model = ConstantVelocity(cond, uncond, reg=True)
        _, cls = sample(model, y, num_steps=3, cfg_scale=1.5, cls_cfg_scale=cls_scale, noise=noise,
                        cls_noise=cls_noise, return_cls=True)
        torch.testing.assert_close(cls, (cls_noise - expected_v).float())


@pytest.mark.parametrize("method", ["euler", "heun", "euler_maruyama"])
def test_real_model_sampling_is_reproducible_by_seed(method):
    model = randomize(tiny_model(reg=True, car_flow="joint")).eval()
    y = torch.tensor([1, 4, 10])
    kwargs = dict(num_steps=3, method=method, cfg_scale=2.0, guidance_interval=(0.0, 0.7))
    a, a_cls = sample(model, y, seed=5, return_cls=True, **kwargs)
    b, b_cls = sample(model, y, seed=5, return_cls=True, **kwargs)
    c = sample(model, y, seed=6, **kwargs)
    assert a.shape == (3, 4, 8, 8) and a.dtype == torch.float32 and a_cls.shape == (3, 24)
    assert torch.equal(a, b) and torch.equal(a_cls, b_cls) and not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_real_model_car_flow_start_and_end():
    # At init the velocity is zero, so the ODE returns its start shifted back: noise + mu0 - mu1.
    model = tiny_model(z_dims=[], car_flow="joint", car_flow_rank=8).eval()
    for net in model.shift_nets():
        randomize(net)
    y, noise = torch.tensor([0, 9]), torch.randn(2, 4, 8, 8)
    mu0, mu1 = model.car_flow_shifts(y)
    out = sample(model, y, num_steps=4, noise=noise)
    torch.testing.assert_close(out, (noise + mu0 - mu1).detach())
    assert not torch.allclose(mu0, mu1)


def test_sampler_errors():
    model = tiny_model(class_dropout_prob=0.0, z_dims=[])
    y = torch.tensor([0])
    with pytest.raises(ValueError, match="null class"):
        sample(model, y, num_steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="method"):
        sample(model, y, method="dpm")
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(model, y, guidance_interval=(0.8, 0.2))


def repa_loop(model, noise, y, num_steps, method, cfg_scale, low, high, seed=None, null=10):
    """REPA's samplers.py loops written out for a plain velocity model (no REG, no CAR-Flow): guidance
    decided by `low <= t_cur <= high` for the step (Heun's corrector included) and for the SDE's final
    mean step; the SDE drift v - t * score, score = (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma)
    on the linear path. Noise of the SDE steps from a generator seeded with `seed`, one draw per step."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def drift(x, t, guide, sde):
        x_in, y_in = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, null)])) if guide else (x, y)
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64)
        v = model(x_in.float(), t_in.float(), y_in)[0].double()
        if sde:
            ratio = (1 - t) / -1.0  # alpha / alpha'
            score = (ratio * v - x_in) / (t ** 2 - ratio * t)
            v = v - t * score
        if guide:
            cond, uncond = v.chunk(2)
            v = uncond + cfg_scale * (cond - uncond)
        return v

    inside = lambda t: cfg_scale > 1.0 and low <= t <= high  # noqa: E731
    x = noise.double()
    if method in ("euler", "heun"):
        t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            d = drift(x, t_cur, inside(t_cur), False)
            x_next = x + (t_next - t_cur) * d
            if method == "heun" and i < num_steps - 1:
                d2 = drift(x_next, t_next, inside(t_cur), False)
                x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
            x = x_next
        return x.float()
    t_steps = torch.linspace(1, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt = t_next - t_cur
        d = drift(x, t_cur, inside(t_cur), True)
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        x = x + d * dt + (2 * t_cur) ** 0.5 * eps * abs(dt) ** 0.5
    t_cur, t_next = t_steps[-2], t_steps[-1]
    return (x + (t_next - t_cur) * drift(x, t_cur, inside(t_cur), True)).float()


@pytest.mark.parametrize("method", ["euler", "heun", "euler_maruyama"])
def test_guidance_interval_against_repas_loop(method):
    """A real (random) SiT: the interval split inside the grid, the whole interval [0, 1] and an interval
    holding no grid time, each against REPA's loop; the last two also bitwise against plain CFG and
    against no guidance."""
    torch.manual_seed(0)
    model = randomize(tiny_model(z_dims=[]), generator=torch.Generator().manual_seed(1)).eval()
    y, noise = torch.tensor([1, 4, 7]), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    steps, scale, seed = 6, 3.0, 11
    # euler/heun grid 1, 5/6, ..., 0; SDE grid 1, 0.808, 0.616, 0.424, 0.232, 0.04, then 0
    runs = {}
    for low, high in ((0.3, 0.7), (0.0, 1.0), (0.55, 0.6)):
        got = sample(model, y, num_steps=steps, method=method, cfg_scale=scale, guidance_interval=(low, high),
                     noise=noise, seed=seed)
        want = repa_loop(model, noise, y, steps, method, scale, low, high, seed=seed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        runs[low, high] = got
    plain_cfg = sample(model, y, num_steps=steps, method=method, cfg_scale=scale, noise=noise, seed=seed)
    unguided = sample(model, y, num_steps=steps, method=method, cfg_scale=1.0, noise=noise, seed=seed)
    assert torch.equal(runs[0.0, 1.0], plain_cfg)
    assert torch.equal(runs[0.55, 0.6], unguided)  # no step's t_cur lies in [0.55, 0.6]
    split = runs[0.3, 0.7]
    assert not torch.allclose(split, plain_cfg, atol=1e-3) and not torch.allclose(split, unguided, atol=1e-3)
