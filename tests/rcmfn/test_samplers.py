"""rcmfn.rollout / rcmfn.samplers: grids, gradient only through the last step, and exactness on Gaussians."""

import math

import pytest
import torch

from rcmfn.precond import trigflow_denoiser, velocity_from_x0
from rcmfn.rollout import consistency_rollout, rollout_times
from rcmfn.samplers import consistency_sample, consistency_times, teacher_euler_sample, teacher_rf_times
from rcmfn.time import LogNormal, UniformShift, rf_to_sigma
from tests.conftest import make_small_net

MEAN, STD = 0.7, 0.5  # data x0 ~ N(MEAN, STD^2 I)


def gaussian_flow_map(params, x_t, t, cond):
    """Exact consistency function of N(MEAN, STD^2) data as a TrigFlow velocity: the PF-ODE keeps the
    standardised value (x_t - cos t MEAN) / sqrt(cos^2 STD^2 + sin^2) fixed (derived)."""
    tb = t.view(-1, *([1] * (x_t.dim() - 1))).double()
    scale = torch.sqrt(torch.cos(tb) ** 2 * STD**2 + torch.sin(tb) ** 2)
    x0 = MEAN + STD * (x_t.double() - torch.cos(tb) * MEAN) / scale
    return velocity_from_x0(x_t.double(), t.double(), x0).to(x_t.dtype)


def gaussian_posterior_mean(params, x_t, t, cond):
    """Exact E[x0 | x_t] of N(MEAN, STD^2) data as a TrigFlow velocity (a denoiser, not a flow map)."""
    tb = t.view(-1, *([1] * (x_t.dim() - 1))).double()
    c, s = torch.cos(tb), torch.sin(tb)
    x0 = MEAN + c * STD**2 / (c**2 * STD**2 + s**2) * (x_t.double() - c * MEAN)
    return velocity_from_x0(x_t.double(), t.double(), x0).to(x_t.dtype)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_with_exact_flow_map_reproduces_data_moments(steps):
    n = 100_000
    noise = torch.randn(steps, n, 4, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    times = consistency_times(steps, sigma_max=1e4, mid_times=(1.5, 1.0, 0.6))
    x = consistency_sample(gaussian_flow_map, None, noise, times, torch.zeros(n, 1, 1))
    assert x.mean().item() == pytest.approx(MEAN, abs=5e-3)
    cov = torch.cov(x.T)
    torch.testing.assert_close(cov, STD**2 * torch.eye(4, dtype=torch.float64), atol=4e-3, rtol=0)


def test_teacher_euler_converges_to_data_moments_at_first_order():
    n = 20_000
    noise = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (100, 200):
        rf = teacher_rf_times(steps, shift=1.0, sigma_max=1e4)
        x = teacher_euler_sample(gaussian_posterior_mean, None, noise, rf, torch.zeros(n, 1, 1))
        assert x.mean().item() == pytest.approx(MEAN, abs=1e-2)
        errors.append(abs(x.var(dim=0).mean().item() - STD**2))
    assert errors[1] < 0.01 and 1.5 < errors[0] / errors[1] < 3.5, errors


def test_time_grids_match_spec():
    grid = consistency_times(4, sigma_max=80.0)
    torch.testing.assert_close(grid, torch.tensor([math.atan(80.0), 1.5, 1.4, 1.0, 0.0], dtype=torch.float64))
    rf = teacher_rf_times(10, shift=5.0, sigma_max=80.0)
    assert rf[0].item() == pytest.approx(80 / 81) and rf[-1] == 0 and (rf.diff() < 0).all()
    assert rf_to_sigma(rf[:1]).item() == pytest.approx(80.0)
    with pytest.raises(ValueError, match="mid times"):
        consistency_times(3, mid_times=(1.0,))
    with pytest.raises(ValueError, match="non-increasing"):
        consistency_times(2, mid_times=(1.57,), sigma_max=1.0)


@pytest.mark.parametrize("dist", [LogNormal(0.0, 1.6), UniformShift(5.0)])
def test_rollout_times_are_monotone_from_half_pi_to_zero(dist):
    times = rollout_times(4, 64, dist, torch.Generator().manual_seed(0))
    assert times.shape == (5, 64)
    assert (times[0] == math.pi / 2).all() and (times[-1] == 0).all()
    assert (times.diff(dim=0) <= 0).all()
    fixed = rollout_times(3, 2, None, None, fixed_times=(1.5, 1.4, 1.0))
    torch.testing.assert_close(fixed[:, 0], torch.tensor([math.pi / 2, 1.5, 1.4, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps"):
        rollout_times(0, 2, dist)


def test_rollout_gradient_flows_only_through_the_last_step():
    net, params = make_small_net()
    params = params.apply(lambda p: p.detach().requires_grad_(True))
    denoise = trigflow_denoiser(net)
    calls = []

    def counting(p, x, t, c):
        calls.append(torch.is_grad_enabled())
        return denoise(p, x, t, c)

    noise = torch.randn(3, 2, 3, 1, 2, 2, dtype=torch.float64)
    times = rollout_times(3, 2, LogNormal(0.0, 1.6), torch.Generator().manual_seed(1))
    out = consistency_rollout(counting, params, noise, times, torch.randn(2, 4, 5, dtype=torch.float64))
    assert calls == [False, False, True]
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
