"""rcmfn.divergence and the loop's use of it: a non-finite gradient skips the step and changes nothing;
K consecutive bad steps stop the run with a named error; non-finite weights are never saved."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrypoints.distill import run
from entrypoints.toy import build_toy, toy_batch_fn
from rcmfn.divergence import DivergenceError, check_finite_weights, gradient_health
from rcmfn.loop import LoopConfig, Networks, init_state, train_iteration
from rcmfn.step import LossConfig
from tests.entrypoints.test_distill import TINY_TOY, tiny_config


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4)), min_size=1, max_size=4),
    scale=st.floats(1e-30, 1e30),
    seed=st.integers(0, 2**16),
)
def test_gradient_norm_is_the_float64_norm_and_never_overflows(shapes, scale, seed):
    g = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(s, generator=g) * scale).float() for s in shapes]
    want = math.sqrt(sum(float((t.double() ** 2).sum()) for t in grads))
    health = gradient_health(grads)
    assert health.finite and health.nonfinite == 0
    assert health.norm == pytest.approx(want, rel=1e-12)


def test_non_finite_gradients_are_counted():
    grads = [torch.tensor([1.0, float("nan"), 2.0]), None, torch.tensor([[float("inf"), -float("inf")]])]
    health = gradient_health(grads)
    assert not health.finite and health.nonfinite == 3
    assert gradient_health([]).norm == 0.0


def test_non_finite_weights_are_named_and_refused():
    weights = {"a.weight": torch.ones(3), "b.bias": torch.tensor([0.0, float("nan")])}
    refused = r"not writing checkpoint 7: the student weights are not finite \(b.bias\)"
    with pytest.raises(DivergenceError, match=refused):
        check_finite_weights({"student": weights, "fake score": None}, "checkpoint 7")
    check_finite_weights({"student": {"a.weight": torch.ones(3)}}, "checkpoint 7")


@pytest.fixture(scope="module")
def toy():
    return build_toy(TINY_TOY, seed=0, progress=False)


def _state_and_nets(toy, max_bad_steps=2):
    cfg = LoopConfig(LossConfig(method="rcm", guidance=2.0), student_update_freq=2, max_bad_steps=max_bad_steps)
    nets = Networks(student=toy.student, teacher=toy.teacher, teacher_params=toy.mixture, fake=toy.student)
    return init_state(toy.init_params, toy.init_params, cfg), nets, cfg


def _snapshot(state):
    return {
        "student": state.student.detach().clone(),
        "ema": state.ema.clone(),
        "fake": state.fake.detach().clone(),
        "student_opt": copy.deepcopy(state.student_opt.state_dict()),
        "fake_opt": copy.deepcopy(state.fake_opt.state_dict()),
        "steps": (state.student_steps, state.critic_steps),
    }


def _assert_same(a, b):
    for key in ("student", "ema", "fake"):
        assert (a[key] == b[key]).all(), key
    assert a["steps"] == b["steps"]
    for key in ("student_opt", "fake_opt"):
        assert str(a[key]["param_groups"]) == str(b[key]["param_groups"]), key
        for p, s in a[key]["state"].items():
            assert all(torch.equal(v, b[key]["state"][p][k]) for k, v in s.items()), key


def test_a_non_finite_gradient_skips_the_step_and_changes_nothing(toy):
    state, nets, cfg = _state_and_nets(toy)
    batch_fn = toy_batch_fn(toy)
    for _ in range(2):  # one student and one critic step with finite gradients, so optimiser state exists
        assert not train_iteration(state, nets, batch_fn, cfg)["step_skipped"]
    before = _snapshot(state)
    leaf = next(iter(state.student.values()))
    hook = leaf.register_hook(lambda g: g * float("inf"))  # finite loss, non-finite gradient
    metrics = train_iteration(state, nets, batch_fn, cfg)
    assert metrics["phase"] == "student" and metrics["step_skipped"] and metrics["grad_nonfinite"] > 0
    assert not math.isfinite(metrics["grad_norm"]) and math.isfinite(metrics["scm_loss"])
    assert state.iteration == 3 and state.bad_steps["student"] == 1
    _assert_same(_snapshot(state), before)  # weights, EMA, optimiser states and step counts
    train_iteration(state, nets, batch_fn, cfg)  # a critic step between does not reset the student's run
    with pytest.raises(DivergenceError, match=r"the student diverged: 2 consecutive bad steps up to iteration 4"):
        train_iteration(state, nets, batch_fn, cfg)
    hook.remove()
    state.iteration += 1
    train_iteration(state, nets, batch_fn, cfg)  # a good step ends the run of bad ones
    train_iteration(state, nets, batch_fn, cfg)
    assert state.bad_steps["student"] == 0


def test_fully_masked_steps_count_as_bad(toy):
    state, nets, cfg = _state_and_nets(toy)
    batch_fn = toy_batch_fn(toy)

    def nan_batch(gen):
        x0, cond, uncond = batch_fn(gen)
        return torch.full_like(x0, float("nan")), cond, uncond

    metrics = train_iteration(state, nets, nan_batch, cfg)
    assert metrics["scm_masked"] == TINY_TOY.batch_size and metrics["scm_loss"] == 0.0
    # A masked sample's zero loss gradient still meets its NaN activations in the weight gradients
    # (0 x NaN): the step is skipped as well, and both are reported.
    assert metrics["step_skipped"]
    train_iteration(state, nets, nan_batch, cfg)  # critic: its rollout starts from noise, not the data
    with pytest.raises(DivergenceError, match="all 4 samples of the scm loss non-finite"):
        train_iteration(state, nets, nan_batch, cfg)


def test_toy_run_with_a_huge_learning_rate_stops_and_saves_nothing_non_finite(tmp_path, capsys):
    """The issue's case: --student-lr 1e6 logged zero losses, exited 0 and saved NaN weights."""
    with pytest.raises(DivergenceError, match="diverged"):
        run(tiny_config(tmp_path, student_lr=1e6, fake_lr=1e6, iterations=60, save_every=2))
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    from safetensors.torch import load_file

    for step in (tmp_path / "checkpoints").glob("step-*"):
        for name in ("student", "ema", "fake"):
            assert all(torch.isfinite(t).all() for t in load_file(step / f"{name}.safetensors").values())
