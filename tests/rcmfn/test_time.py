"""rcmfn.time: the three clocks invert each other, are monotone, and the samplers land in range."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn import time as T

unit = st.floats(1e-6, 1 - 1e-6)


@given(st.lists(unit, min_size=1, max_size=16))
def test_trig_time_inverts_rf_time(rs):
    r = torch.tensor(rs, dtype=torch.float64)
    torch.testing.assert_close(T.trig_to_rf(T.rf_to_trig(r)), r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(T.sigma_to_rf(T.rf_to_sigma(r)), r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(T.sigma_to_trig(T.rf_to_sigma(r)), T.rf_to_trig(r), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(T.trig_to_sigma(T.rf_to_trig(r)), T.rf_to_sigma(r), rtol=1e-9, atol=1e-12)


def test_time_maps_are_monotone_and_hit_endpoints():
    r = torch.linspace(0, 1, 1001, dtype=torch.float64)
    t = T.rf_to_trig(r)
    assert (t.diff() > 0).all() and t[0] == 0 and abs(t[-1].item() - math.pi / 2) < 1e-15
    sigma = T.rf_to_sigma(r)
    assert (sigma.diff() > 0).all() and torch.isfinite(sigma).all()


@given(st.lists(unit, min_size=1, max_size=8), st.floats(0.5, 10.0))
def test_shift_inverts_and_preserves_endpoints(us, shift):
    u = torch.tensor(us, dtype=torch.float64)
    torch.testing.assert_close(T.unshift_rf_time(T.shift_rf_time(u, shift), shift), u, rtol=1e-10, atol=1e-12)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(T.shift_rf_time(ends, shift), ends)
    assert torch.equal(T.shift_rf_time(u, 0.0), u)


def test_shift_five_matches_closed_form():
    u = torch.tensor([0.25], dtype=torch.float64)
    assert T.shift_rf_time(u, 5.0).item() == pytest.approx(5 * 0.25 / (1 + 4 * 0.25))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_lognormal_draws_match_official_recipe_in_every_domain(seed):
    dist = T.LogNormal(0.7, 1.6)
    draws = {d: T.sample_time(dist, 64, torch.Generator().manual_seed(seed), d) for d in ("sigma", "trig", "rf")}
    normal = torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
    torch.testing.assert_close(draws["sigma"], torch.exp(0.7 + 1.6 * normal))
    torch.testing.assert_close(draws["trig"], torch.atan(draws["sigma"]))
    torch.testing.assert_close(draws["rf"], draws["sigma"] / (1 + draws["sigma"]))
    assert draws["trig"].dtype == torch.float64
    assert ((draws["trig"] > 0) & (draws["trig"] < math.pi / 2)).all()


def test_uniform_shift_draws_follow_the_shifted_law():
    r = T.sample_time(T.UniformShift(5.0), 200_000, torch.Generator().manual_seed(0), "rf")
    # P(r <= shift(0.5)) = 0.5 exactly for u ~ U[0, 1)
    median = T.shift_rf_time(torch.tensor(0.5, dtype=torch.float64), 5.0)
    assert (r <= median).double().mean().item() == pytest.approx(0.5, abs=5e-3)
    t = T.sample_time(T.UniformShift(5.0), 10, torch.Generator().manual_seed(0), "trig")
    torch.testing.assert_close(t, T.rf_to_trig(r[:10]))


def test_bad_inputs_raise_named_errors():
    with pytest.raises(ValueError, match="unknown time domain"):
        T.sample_time(T.LogNormal(), 4, domain="minutes")
    with pytest.raises(ValueError, match=r"\(0, pi/2\)"):
        T.check_trig_time(torch.tensor([0.5, 1.7], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        T.check_trig_time(torch.tensor([float("nan")]))
    T.check_trig_time(torch.tensor([0.0, math.pi / 2]), allow_endpoints=True)
