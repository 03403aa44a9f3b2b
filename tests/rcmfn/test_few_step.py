"""rcmfn.few_step: the student's sampler settings, its grids in float64."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.few_step import FewStepSettings, describe_grid
from rcmfn.samplers import consistency_times


@settings(max_examples=30, deadline=None)
@given(
    sigma_max=st.floats(15.0, 5000.0),  # atan(15) = 1.504 > every mid time drawn
    mids=st.lists(st.floats(0.05, 1.5), min_size=0, max_size=4).map(lambda m: tuple(sorted(m, reverse=True))),
)
def test_rf_times_are_sigma_over_one_plus_sigma_of_the_trig_grid(sigma_max, mids):
    s = FewStepSettings(sigma_max, mids)
    for steps in range(1, s.max_steps + 1):
        trig = s.trig_times(steps)
        assert torch.equal(trig, consistency_times(steps, sigma_max, mids))
        sigma = [math.tan(t) for t in trig[:-1].tolist()]
        expected = torch.tensor([x / (1.0 + x) for x in sigma], dtype=torch.float64)
        torch.testing.assert_close(s.rf_times(steps), expected, rtol=1e-12, atol=0)
    assert s.rf_times(1)[0].item() == pytest.approx(sigma_max / (1 + sigma_max), rel=1e-12)


def test_describe_grid_names_times_sigmas_and_network_timesteps():
    line = describe_grid(FewStepSettings(80.0, (1.5, 1.4, 1.0)), 2, 1000.0)
    assert line.startswith("2 steps: TrigFlow times [1.5583, 1.5]") and "sigma [80.0, 14.101]" in line
    assert "network timesteps [987.654, 933.781]" in line


def test_bad_settings_and_too_many_steps_are_refused():
    with pytest.raises(ValueError, match="non-increasing"):
        FewStepSettings(80.0, (1.0, 1.2))
    with pytest.raises(ValueError, match="sigma_max must be positive"):
        FewStepSettings(0.0, (1.0,))
    with pytest.raises(ValueError, match="3 steps need 2 mid times"):
        FewStepSettings(80.0, (1.0,)).trig_times(3)
