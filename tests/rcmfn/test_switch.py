"""rcmfn/switch.py: per-sample routing to two experts, its JVP, and the samplers that switch at the boundary."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.precond import guided_velocity, trigflow_denoiser
from rcmfn.samplers import teacher_euler_sample, teacher_rf_times
from rcmfn.switch import (
    ExpertSwitch,
    expert_steps,
    is_high_noise,
    split_rf_grid,
    switched_denoiser,
    switched_teacher_euler_sample,
)
from rcmfn.time import rf_to_trig
from tests.conftest import make_small_net

SWITCH = ExpertSwitch(boundary=0.875, guidance_high=4.0, guidance_low=3.0)


def experts():
    """Two different small float64 velocity nets as TrigFlow denoisers, with their params."""
    net_h, params_h = make_small_net(seed=1)
    net_l, params_l = make_small_net(seed=2)
    return trigflow_denoiser(net_h), trigflow_denoiser(net_l), {"high": params_h, "low": params_l}


def batch(r: list[float], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = torch.tensor(r, dtype=torch.float64)
    x = torch.randn(len(r), 3, 1, 2, 2, generator=g, dtype=torch.float64)
    cond = torch.randn(len(r), 4, 5, generator=g, dtype=torch.float64)
    return x, rf_to_trig(r), cond


def test_switch_validates_and_converts_the_boundary():
    assert SWITCH.trig_boundary == pytest.approx(math.atan(7.0), abs=1e-15)
    assert SWITCH.trig_range("high") == (SWITCH.trig_boundary, math.pi / 2)
    assert SWITCH.trig_range("low") == (0.0, SWITCH.trig_boundary)
    assert (SWITCH.guidance("high"), SWITCH.guidance("low")) == (4.0, 3.0)
    for bad in (0.0, 1.0, -0.2, float("nan")):
        with pytest.raises(ValueError, match="boundary must lie in"):
            ExpertSwitch(bad)
    with pytest.raises(ValueError, match="guidance_low"):
        ExpertSwitch(0.5, 2.0, 0.5)
    with pytest.raises(ValueError, match="unknown expert"):
        SWITCH.trig_range("middle")


def test_each_sample_runs_through_its_own_expert_only():
    high, low, params = experts()
    x, t, cond = batch([0.99, 0.2, 0.875, 0.874999, 0.5, 0.95])  # the boundary itself is high (t >= boundary)
    assert is_high_noise(SWITCH, t).tolist() == [True, False, True, False, False, True]
    out = switched_denoiser(high, low, SWITCH)(params, x, t, cond)
    want_h, want_l = high(params["high"], x, t, cond), low(params["low"], x, t, cond)
    mask = is_high_noise(SWITCH, t)
    assert (want_h - want_l).abs().min() > 1e-3  # the experts differ everywhere: routing is visible
    # equal up to the rounding of a smaller matmul batch
    torch.testing.assert_close(out[mask], want_h[mask], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out[~mask], want_l[~mask], rtol=1e-13, atol=1e-13)


def test_a_batch_of_one_expert_never_calls_the_other():
    high, _, params = experts()

    def poisoned(*args):
        raise AssertionError("the low expert was called for a high-noise batch")

    x, t, cond = batch([0.9, 0.99])
    out = switched_denoiser(high, poisoned, SWITCH)(params, x, t, cond)
    assert torch.equal(out, high(params["high"], x, t, cond))
    with pytest.raises(KeyError, match="lack expert"):
        switched_denoiser(high, poisoned, SWITCH)({"high": params["high"]}, x, t, cond)


def test_jvp_through_a_mixed_batch_matches_float64_central_difference():
    high, low, params = experts()
    x, t, cond = batch([0.95, 0.3, 0.7, 0.9])
    denoise = switched_denoiser(high, low, SWITCH)
    tx, tt = torch.randn_like(x), 0.01 * torch.ones_like(t)  # small time tangent: no sample crosses r_b
    _, tangent = torch.func.jvp(lambda x, t: denoise(params, x, t, cond), (x, t), (tx, tt))
    step = 1e-6
    central = (
        denoise(params, x + step * tx, t + step * tt, cond) - denoise(params, x - step * tx, t - step * tt, cond)
    ) / (2 * step)
    assert tangent.abs().max() > 0.1
    torch.testing.assert_close(tangent, central, rtol=0.0, atol=1e-7 * tangent.abs().max().item())


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 60), shift=st.floats(1.0, 20.0), boundary=st.floats(0.05, 0.95))
def test_grid_split_gives_each_step_to_the_expert_of_its_start(steps, shift, boundary):
    switch = ExpertSwitch(boundary)
    rf = teacher_rf_times(steps, shift, 80.0)
    high, low = split_rf_grid(rf, switch)
    assert torch.equal(torch.cat([high, low[1:]]), rf)  # the parts share the switch point, nothing lost
    assert (high[:-1] >= boundary).all() and (low[:-1] < boundary).all()
    assert expert_steps(rf_to_trig(rf), switch) == ["high"] * (len(high) - 1) + ["low"] * (len(low) - 1)


def test_wan22_sampler_switches_where_the_official_timesteps_cross_875():
    """40 steps, shift 12 (wan_t2v_A14B.py): the expert of step i is high iff 1000 r_i >= 875."""
    rf = teacher_rf_times(40, 12.0, 1e9)
    high, _ = split_rf_grid(rf, SWITCH)
    official = [bool(1000 * r >= 875.0) for r in rf[:-1].tolist()]
    assert official.count(True) == len(high) - 1 and 0 < len(high) - 1 < 40


def test_switched_teacher_euler_is_euler_with_each_steps_expert_and_guidance():
    high, low, params = experts()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, 1, 2, 2, generator=g, dtype=torch.float64)
    cond, uncond = (
        torch.randn(2, 4, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 5, generator=g, dtype=torch.float64),
    )
    rf = teacher_rf_times(12, 3.0, 80.0)
    pair = {"high": (high, params["high"]), "low": (low, params["low"])}
    got = switched_teacher_euler_sample(pair, SWITCH, noise, rf, cond, uncond)
    x = noise.clone()  # reference: one Euler step at a time, the expert and weight picked per step
    for r, r_next in zip(rf[:-1].tolist(), rf[1:].tolist(), strict=True):
        name = "high" if r >= SWITCH.boundary else "low"
        x = teacher_euler_sample(
            pair[name][0],
            pair[name][1],
            x,
            torch.tensor([r, r_next], dtype=torch.float64),
            cond,
            uncond,
            SWITCH.guidance(name),
        )
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)
    only_low = teacher_euler_sample(low, params["low"], noise, rf, cond, uncond, 3.0)
    assert (got - only_low).abs().max() > 1e-3  # the high expert did change the sample
    t = rf_to_trig(torch.full((2,), 0.9, dtype=torch.float64))
    assert guided_velocity(high, params["high"], noise, t, cond, uncond, 4.0).abs().mean() > 0
