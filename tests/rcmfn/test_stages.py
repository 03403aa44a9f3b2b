"""rcmfn/stages.py: parsing, the stage of an iteration, and a staged run equal (in float64, bit for bit) to
the chain of single-method runs that the official code would launch, each from the previous one's weights."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.loop import LoopConfig, Networks, OptimConfig, init_state, train_iteration
from rcmfn.precond import trigflow_denoiser
from rcmfn.stages import (
    Stage,
    check_stage_record,
    format_stages,
    method_at,
    parse_stages,
    restart_at_boundary,
    stage_at,
    stage_record,
    stage_starts,
    staged_iteration,
    total_iterations,
)
from rcmfn.step import METHODS, LossConfig
from tests.conftest import make_small_net

stage_lists = st.lists(st.builds(Stage, st.sampled_from(METHODS), st.integers(1, 10_000)), min_size=1, max_size=6).map(
    tuple
)


@settings(max_examples=200, deadline=None)
@given(stages=stage_lists)
def test_format_and_parse_are_inverse(stages):
    assert parse_stages(format_stages(stages)) == stages
    assert parse_stages(" , ".join(f" {s.method} : {s.iterations} " for s in stages)) == stages  # spaces allowed


@settings(max_examples=200, deadline=None)
@given(stages=stage_lists, data=st.data())
def test_every_iteration_belongs_to_the_one_stage_that_counts_it(stages, data):
    """Stage s runs iterations [start_s, start_s + n_s); the starts are the running sums; the end belongs to
    the last stage; the method of k is a function of k and the stages alone."""
    total = total_iterations(stages)
    k = data.draw(st.integers(0, total))
    index, start = stage_at(k, stages)
    assert stage_starts(stages)[index] == start == sum(s.iterations for s in stages[:index])
    if k < total:
        assert start <= k < start + stages[index].iterations
    else:
        assert index == len(stages) - 1
    assert method_at(k, stages) == stages[index].method
    expanded = [s.method for s in stages for _ in range(s.iterations)] if total <= 2000 else None
    if expanded is not None and k < total:
        assert expanded[k] == method_at(k, stages)
    with pytest.raises(ValueError, match="outside the stages"):
        stage_at(total + 1, stages)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "--stages is empty"),
        ("dcm:2,foo:3", "stage 'foo:3': unknown method 'foo'; valid: rcm, scm, dmd, dcm, dcm\\+dmd"),
        ("dcm:0", "stage 'dcm:0': iterations must be >= 1; got 0"),
        ("scm:-3", "iterations must be >= 1; got -3"),
        ("rcm:two", "stage 'rcm:two': iterations 'two' is not a whole number"),
        ("rcm:1.5", "is not a whole number"),
        ("dcm", "stage 'dcm' is not method:iterations"),
        ("dcm:2,", "stage '' is not method:iterations"),
    ],
)
def test_bad_stage_strings_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_stages(text)


def test_dcm_plus_dmd_is_the_dcm_term_with_the_dmd_term():
    """The official cm_type = "dcm" with a fake score (t2v_model_distill_rcm.py:702-722)."""
    cfg = LossConfig(method="dcm+dmd")
    assert (cfg.consistency, cfg.uses_critic) == ("dcm", True)
    assert [LossConfig(method=m).consistency for m in ("rcm", "scm", "dcm", "dmd")] == ["scm", "scm", "dcm", None]
    assert not LossConfig(method="dcm").uses_critic and not LossConfig(method="dcm+dmd", loss_scale_dmd=0).uses_critic
    assert parse_stages("dcm+dmd:5,rcm:2") == (Stage("dcm+dmd", 5), Stage("rcm", 2))


def _problem(seed=0):
    """Float64 teacher and student/fake nets, and a batch function drawing from the step's generator."""
    teacher_net, teacher_params = make_small_net(seed=seed + 1)
    student_net, student_params = make_small_net(seed=seed)
    in_float64 = lambda net: lambda p, x, c, cond: net(p, x.double(), c.double(), cond.double())  # noqa: E731
    teacher = trigflow_denoiser(in_float64(teacher_net))  # the rollout's float32 noise computes in float64 too
    student = trigflow_denoiser(in_float64(student_net))
    nets = Networks(student=student, teacher=teacher, teacher_params=teacher_params.detach(), fake=student)

    def batch_fn(gen):
        x0 = torch.randn(3, 3, 1, 2, 2, generator=gen, dtype=torch.float64)
        cond = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
        return x0, cond, torch.zeros_like(cond)

    return nets, student_params.detach(), batch_fn


def _config(method: str) -> LoopConfig:
    optim = OptimConfig(student_lr=1e-2, fake_lr=2e-2, lr_warmup_steps=2, ema_rate=0.1)
    loss = LossConfig(method=method, guidance=2.0, loss_scale_dmd=1.0 if method == "dmd" else 10.0)
    return LoopConfig(loss, optim, tangent_warmup=0 if method == "dmd" else 1, student_update_freq=2, seed=3)


def _equal(a, b) -> bool:
    return all(torch.equal(a.get(k), b.get(k)) for k in a.keys(include_nested=True, leaves_only=True))


@settings(max_examples=12, deadline=None)
@given(stages=st.lists(st.builds(Stage, st.sampled_from(METHODS), st.integers(1, 4)), min_size=1, max_size=3))
def test_a_staged_run_is_the_chain_of_single_method_runs(stages):
    """Each stage as a fresh run (new AdamW, EMA = the student, every schedule from 0) started from the
    previous stage's student and fake score, drawing with the run's iteration: bit for bit in float64."""
    stages = tuple(stages)
    configs = tuple(_config(s.method) for s in stages)
    nets, init, batch_fn = _problem()
    staged = init_state(init, init, configs[0])
    staged_metrics = [
        staged_iteration(staged, nets, batch_fn, stages, configs) for _ in range(sum(s.iterations for s in stages))
    ]

    student, fake, chain_metrics = init, init, []
    for stage, start, cfg in zip(stages, stage_starts(stages), configs, strict=True):
        chained = init_state(student, fake, cfg)
        chained.iteration = start
        chain_metrics += [
            train_iteration(chained, nets, batch_fn, cfg, stage_start=start) for _ in range(stage.iterations)
        ]
        student, fake = chained.student, chained.fake
    assert _equal(staged.student, chained.student) and _equal(staged.fake, chained.fake)
    assert _equal(staged.ema, chained.ema)
    assert (staged.student_steps, staged.critic_steps) == (chained.student_steps, chained.critic_steps)
    drop = ("stage", "method")
    assert [{k: v for k, v in m.items() if k not in drop} for m in staged_metrics] == chain_metrics
    assert [m.get("stage", 0) for m in staged_metrics] == [stage_at(k, stages)[0] for k in range(len(staged_metrics))]


def test_one_stage_is_the_plain_loop():
    """The default (no --stages) goes through staged_iteration with one stage: nothing changes."""
    cfg = _config("rcm")
    nets, init, batch_fn = _problem()
    plain, staged = init_state(init, init, cfg), init_state(init, init, cfg)
    plain_metrics = [train_iteration(plain, nets, batch_fn, cfg) for _ in range(5)]
    staged_metrics = [staged_iteration(staged, nets, batch_fn, (Stage("rcm", 5),), (cfg,)) for _ in range(5)]
    assert plain_metrics == staged_metrics
    assert _equal(plain.student, staged.student) and _equal(plain.ema, staged.ema) and _equal(plain.fake, staged.fake)


def test_a_boundary_restarts_the_optimisers_and_the_ema_and_keeps_the_weights():
    cfg = _config("rcm")
    nets, init, batch_fn = _problem()
    state = init_state(init, init, cfg)
    for _ in range(4):
        train_iteration(state, nets, batch_fn, cfg)
    weights = state.student.clone()
    assert state.student_opt.state and state.fake_opt.state and not _equal(state.ema, state.student.float())
    restart_at_boundary(state)
    assert not state.student_opt.state and not state.fake_opt.state
    assert (state.student_steps, state.critic_steps, state.iteration) == (0, 0, 4)
    assert _equal(state.student, weights) and _equal(state.ema, state.student.float())


def test_stage_records_name_the_next_iterations_stage_and_a_mismatch_is_refused():
    stages = parse_stages("dcm:2,scm:3,rcm:4")
    assert stage_record(2, stages) == {"stage": 1, "stage_method": "scm", "stage_start": 2}
    assert stage_record(9, stages) == {"stage": 2, "stage_method": "rcm", "stage_start": 5}
    check_stage_record({"iteration": 4} | stage_record(4, stages), stages, "iter-4")
    check_stage_record({"iteration": 4}, stages, "iter-4")  # written before stages were recorded
    with pytest.raises(ValueError, match=r"records stage 1 \('scm' from iteration 2\), but --stages dcm:4,rcm:5"):
        check_stage_record({"iteration": 4} | stage_record(4, stages), parse_stages("dcm:4,rcm:5"), "iter-4")


def test_staged_iteration_refuses_mismatched_configs_and_iterations_past_the_end():
    cfg = _config("scm")
    nets, init, batch_fn = _problem()
    state = init_state(init, None, cfg)
    with pytest.raises(ValueError, match="2 stages need as many loop configurations; got 1"):
        staged_iteration(state, nets, batch_fn, parse_stages("scm:1,dcm:1"), (cfg,))
    state.iteration = 2
    with pytest.raises(ValueError, match="iteration 2 is past the stages' 2 iterations"):
        staged_iteration(state, nets, batch_fn, parse_stages("scm:1,dcm:1"), (cfg, _config("dcm")))
