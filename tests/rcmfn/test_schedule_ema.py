"""rcmfn.schedule and rcmfn.ema: the official phase table and the EDM2 power-function EMA."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict

from rcmfn.ema import ema_beta, ema_exponent, ema_update
from rcmfn.schedule import (
    Schedule,
    critic_iteration,
    effective_student_iteration,
    is_student_phase,
    lr_warmup_factor,
    rollout_steps,
)


def test_schedule_matches_the_spec_example():
    s = Schedule(warmup_iterations=1000, student_update_freq=5)
    phases = [is_student_phase(i, s) for i in (0, 999, 1000, 1001, 1004, 1005)]
    assert phases == [True, True, True, False, False, True]
    assert [effective_student_iteration(i, s) for i in (999, 1000, 1004, 1005)] == [999, 1000, 1000, 1001]
    assert [critic_iteration(i, s) for i in (1001, 1002, 1004, 1006)] == [0, 1, 3, 4]
    no_critic = Schedule(warmup_iterations=0, student_update_freq=5, has_critic=False)
    assert all(is_student_phase(i, no_critic) for i in range(20))


@given(st.integers(0, 50), st.integers(1, 12), st.integers(0, 400))
def test_phase_counts_add_up(H, F, i):
    s = Schedule(H, F)
    students = sum(is_student_phase(j, s) for j in range(i + 1))
    assert students == effective_student_iteration(i, s) + 1 or not is_student_phase(i, s)
    if not is_student_phase(i, s):
        assert critic_iteration(i, s) == i - students


def test_rollout_cycle_and_lr_warmup():
    assert [rollout_steps(i) for i in range(6)] == [1, 2, 3, 4, 1, 2]
    assert lr_warmup_factor(0) == pytest.approx(1e-6)
    assert lr_warmup_factor(50) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert lr_warmup_factor(100) == 1.0 and lr_warmup_factor(5, warmup_steps=0) == 1.0
    with pytest.raises(ValueError, match="student_update_freq"):
        Schedule(0, 0)


def test_ema_beta_equals_closed_form():
    assert ema_exponent(0.1) == pytest.approx(6.937, abs=1e-3)
    assert ema_exponent(0.05) == pytest.approx(16.972, abs=1e-3)
    for n, expected in [(1, 0.0041), (10, 0.469), (100, 0.924), (1000, 0.9921)]:
        assert ema_beta(n, 0.1) == pytest.approx(expected, abs=5e-4)  # spec rounds
        assert ema_beta(n, 0.1) == pytest.approx((1 - 1 / (n + 1)) ** (ema_exponent(0.1) + 1), rel=1e-12)
    assert ema_beta(0, 0.1) == 0.0 and ema_beta(0, 0.1, iteration_shift=5) == ema_beta(5, 0.1)
    gamma = ema_exponent(0.1)
    assert gamma**3 + 7 * gamma**2 + (16 - 100) * gamma + (12 - 100) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="EMA rate"):
        ema_exponent(0.5)


def test_ema_update_lerps_every_leaf_and_first_step_copies():
    g = torch.Generator().manual_seed(0)
    params = TensorDict({"a": torch.randn(3, generator=g), "b": {"c": torch.randn(2, 2, generator=g)}}, [])
    ema = params.apply(lambda p: torch.randn_like(p).float())
    out = ema_update(ema, params.apply(lambda p: p.bfloat16()), 0.0)
    torch.testing.assert_close(out["b", "c"], params["b", "c"].bfloat16().float())
    before = out.clone()
    ema_update(out, params, 0.9)
    torch.testing.assert_close(out["a"], 0.9 * before["a"] + 0.1 * params["a"])
    assert out["a"].dtype == torch.float32
