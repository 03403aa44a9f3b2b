"""rcmfn.precond: coefficients, x0 <-> F round trips, the closed-form F and CFG."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.precond import (
    check_guidance,
    guided_velocity,
    noise_from_velocity,
    standard_guidance_from_cosmos,
    trigflow_coefficients,
    trigflow_denoiser,
    velocity_from_x0,
    x0_from_velocity,
)
from rcmfn.step import LossConfig
from rcmfn.time import trig_to_rf

trig = st.floats(1e-4, math.pi / 2 - 1e-4)


@given(st.lists(trig, min_size=1, max_size=8))
def test_coefficients_match_table_and_their_derivatives(ts):
    t = torch.tensor(ts, dtype=torch.float64)
    c = trigflow_coefficients(t)
    D = torch.cos(t) + torch.sin(t)
    torch.testing.assert_close(c.c_in, 1 / D)
    torch.testing.assert_close(c.c_skip, 1 / D)
    torch.testing.assert_close(c.c_out, -torch.sin(t) / D)
    torch.testing.assert_close(c.c_noise, 1000 * trig_to_rf(t))
    # d c_noise / dt = 1000 / D^2 and d c_out / dt = -1 / D^2 (SPEC-rcm §1.2 table)
    _, dnoise = torch.func.jvp(lambda s: trigflow_coefficients(s).c_noise, (t,), (torch.ones_like(t),))
    _, dout = torch.func.jvp(lambda s: trigflow_coefficients(s).c_out, (t,), (torch.ones_like(t),))
    torch.testing.assert_close(dnoise, 1000 / D**2)
    torch.testing.assert_close(dout, -1 / D**2)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), trig, st.integers(0, 1000))
def test_x0_and_velocity_round_trip(batch, t0, seed):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, 2, generator=g, dtype=torch.float64)
    F = torch.randn(batch, 3, 2, generator=g, dtype=torch.float64)
    t = torch.full((batch,), t0, dtype=torch.float64)
    x0 = x0_from_velocity(x_t, t, F)
    torch.testing.assert_close(velocity_from_x0(x_t, t, x0), F, rtol=1e-9, atol=1e-9)
    eps = noise_from_velocity(x_t, t, F)
    tb = t[:, None, None]
    torch.testing.assert_close(torch.cos(tb) * x0 + torch.sin(tb) * eps, x_t)


def test_denoiser_equals_official_two_stage_formula(small_net):
    net, params = small_net
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(4, 3, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 1.0, 1.5], dtype=torch.float64)
    cond = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    F = trigflow_denoiser(net)(params, x_t, t, cond)
    c = trigflow_coefficients(t)
    v = net(params, c.c_in.view(-1, 1, 1, 1, 1) * x_t, c.c_noise, cond)
    x0 = c.c_skip.view(-1, 1, 1, 1, 1) * x_t + c.c_out.view(-1, 1, 1, 1, 1) * v
    tb = t.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(F, (torch.cos(tb) * x_t - x0) / torch.sin(tb))
    # finite at t = 0, where F = x_t + v and x0 = x_t
    zero = torch.zeros(4, dtype=torch.float64)
    F0 = trigflow_denoiser(net)(params, x_t, zero, cond)
    torch.testing.assert_close(x0_from_velocity(x_t, zero, F0), x_t)


def test_cfg_is_affine_combination_and_identity_at_scale_one(small_net):
    net, params = small_net
    denoise = trigflow_denoiser(net)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 3, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    cond, uncond = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64)
    F_c, F_u = denoise(params, x_t, t, cond), denoise(params, x_t, t, uncond)
    torch.testing.assert_close(guided_velocity(denoise, params, x_t, t, cond, uncond, 5.0), F_u + 5 * (F_c - F_u))
    torch.testing.assert_close(guided_velocity(denoise, params, x_t, t, cond, uncond, 1.0), F_c)


def test_bad_inputs_name_the_problem(small_net):
    net, params = small_net
    denoise = trigflow_denoiser(net)
    x_t = torch.randn(2, 3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    with pytest.raises(ValueError, match="shape mismatch between x and condition"):
        denoise(params, x_t, t, torch.randn(3, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="time must have shape"):
        denoise(params, x_t, t[:1], torch.randn(2, 4, 5, dtype=torch.float64))
    cond = torch.randn(2, 4, 5, dtype=torch.float64)
    for bad in (float("nan"), float("inf"), float("-inf"), 0.5, 0.0, -2.0):
        with pytest.raises(ValueError, match="guidance scale must be finite and >= 1"):
            guided_velocity(denoise, params, x_t, t, cond, cond, bad)


@pytest.mark.parametrize("g", [4.0, 4.5, 7.0])
def test_cosmos_guidance_g_is_the_standard_weight_g_plus_one(small_net, g):
    """Cosmos' x0_c + g (x0_c - x0_u) equals rcmfn's standard-form CFG at w = g + 1 (docs/guidance.md)."""
    net, params = small_net
    denoise = trigflow_denoiser(net)
    gen = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 3, 1, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    cond, uncond = torch.randn(2, 2, 4, 5, generator=gen, dtype=torch.float64)
    x0_c = x0_from_velocity(x_t, t, denoise(params, x_t, t, cond))
    x0_u = x0_from_velocity(x_t, t, denoise(params, x_t, t, uncond))
    w = standard_guidance_from_cosmos(g)
    assert w == g + 1
    guided = x0_from_velocity(x_t, t, guided_velocity(denoise, params, x_t, t, cond, uncond, w))
    torch.testing.assert_close(guided, x0_c + g * (x0_c - x0_u), rtol=1e-12, atol=1e-12)


def test_guidance_applies_only_above_one_and_below_one_is_refused():
    """The official rule (teacher_guidance > 1.0): w = 1 is the conditional velocity, one network pass;
    w < 1 or a non-finite w is a named error, at the loss config too."""
    calls = []

    def denoise(params, x_t, t, cond):
        calls.append(cond)
        return x_t * cond.mean()

    x_t, t = torch.ones(2, 3, dtype=torch.float64), torch.tensor([0.3, 1.2], dtype=torch.float64)
    cond, uncond = torch.full((2, 4), 2.0, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    assert torch.equal(guided_velocity(denoise, None, x_t, t, cond, uncond, 1.0), 2 * x_t) and len(calls) == 1
    assert torch.equal(guided_velocity(denoise, None, x_t, t, cond, uncond, 1.5), 3 * x_t) and len(calls) == 3
    assert check_guidance(4.5) == 4.5
    for bad in (0.99, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--guidance: guidance scale must be finite and >= 1"):
            check_guidance(bad, "--guidance")
        with pytest.raises(ValueError, match="guidance scale must be finite and >= 1"):
            LossConfig(guidance=bad)
