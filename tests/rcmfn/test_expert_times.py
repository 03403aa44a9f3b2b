"""Truncated time distributions (rcmfn.time.Truncated) and rollouts that start at a boundary from data
(LossConfig.rollout_start): what one expert's run of a two-expert model trains on."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.step import LossConfig, draw_rollout
from rcmfn.time import LogNormal, Truncated, UniformShift, sample_time, shift_rf_time, trig_to_rf

BASES = [LogNormal(1.5, 1.6), LogNormal(-0.8, 1.6), UniformShift(5.0), UniformShift(1.0)]


def base_cdf(base, t: torch.Tensor) -> torch.Tensor:
    """P(T <= t) of the untruncated base law, float64, in closed form."""
    if isinstance(base, LogNormal):
        return torch.special.ndtr((torch.log(torch.tan(t)) - base.p_mean) / base.p_std)
    r = trig_to_rf(t)
    return r / (base.shift - (base.shift - 1.0) * r)  # u = unshift(r): the shifted law's CDF


@pytest.mark.parametrize("base", BASES, ids=str)
@pytest.mark.parametrize("bounds", [(math.atan(7.0), math.pi / 2), (0.0, math.atan(7.0)), (0.4, 1.1)])
def test_truncated_draws_follow_the_base_law_conditioned_on_the_range(base, bounds):
    lo, hi = bounds
    t = sample_time(Truncated(base, lo, hi), 20000, torch.Generator().manual_seed(0), "trig").sort().values
    assert t.dtype == torch.float64 and t.min() >= lo - 1e-12 and t.max() <= hi + 1e-12
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    expected = (base_cdf(base, t) - base_cdf(base, lo_t)) / (base_cdf(base, hi_t) - base_cdf(base, lo_t))
    empirical = torch.arange(1, t.numel() + 1, dtype=torch.float64) / t.numel()
    assert (expected - empirical).abs().max() < 0.015  # Kolmogorov-Smirnov, 1 % level at n = 20000: 0.0115


@settings(max_examples=40, deadline=None)
@given(
    lo=st.floats(0.0, 1.5),
    width=st.floats(1e-3, 1.5),
    seed=st.integers(0, 2**16),
    base=st.sampled_from(BASES),
    domain=st.sampled_from(["trig", "rf", "sigma"]),
)
def test_truncated_draws_never_leave_the_range_in_any_domain(lo, width, seed, base, domain):
    hi = min(lo + width, math.pi / 2)
    x = sample_time(Truncated(base, lo, hi), 64, torch.Generator().manual_seed(seed), domain)
    t = {"trig": x, "rf": torch.atan2(x, 1 - x), "sigma": torch.atan(x)}[domain]
    assert torch.isfinite(x).all() and t.min() >= lo - 1e-9 and t.max() <= hi + 1e-9


def test_truncated_uniform_shift_is_the_shifted_uniform_on_the_unshifted_interval():
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    r = sample_time(Truncated(UniformShift(5.0), 0.0, math.pi / 2), 8, gen_a, "rf")
    torch.testing.assert_close(r, shift_rf_time(torch.rand(8, generator=gen_b).double(), 5.0), rtol=0, atol=1e-12)


def test_bad_truncations_are_named():
    for lo, hi in ((0.5, 0.5), (-0.1, 1.0), (0.2, 1.6)):
        with pytest.raises(ValueError, match="t_min < t_max"):
            Truncated(LogNormal(), lo, hi)
    with pytest.raises(TypeError, match="not another Truncated"):
        Truncated(Truncated(LogNormal(), 0.1, 1.0), 0.2, 0.9)
    with pytest.raises(ValueError, match="rollout_start"):
        LossConfig(rollout_start=2.0)


def test_rollout_from_the_boundary_starts_at_renoised_data_with_the_default_draws():
    """Same generator draws as the default rollout; only times[0] and the start state change."""
    t_b = math.atan(7.0)
    x0 = torch.randn(3, 4, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    default = LossConfig(p_D=Truncated(UniformShift(5.0), 0.0, t_b))
    start = LossConfig(p_D=default.p_D, rollout_start=t_b)
    a = draw_rollout(3, x0.shape, default, torch.Generator().manual_seed(2), "cpu")
    b = draw_rollout(3, x0.shape, start, torch.Generator().manual_seed(2), "cpu", x0)
    assert torch.equal(a[0][1:], b[0][1:]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert torch.equal(a[1][1:], b[1][1:]) and (b[1][0] == t_b).all() and (a[1][0] == math.pi / 2).all()
    assert (b[1][1:-1] <= t_b).all()
    want = math.cos(t_b) * x0.double() + math.sin(t_b) * a[0][0].double()
    torch.testing.assert_close(b[0][0].double(), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs the batch's x0"):
        draw_rollout(3, x0.shape, start, torch.Generator().manual_seed(2), "cpu")
