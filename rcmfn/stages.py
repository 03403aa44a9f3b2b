"""Staged training: one run as a sequence of (method, iterations) stages, e.g. dCM -> sCM -> rCM.

SPEC-rcm errata: the official README now advises dCM warm-up -> sCM -> sCM + DMD, joint sCM + DMD being
prone to instability (issue 20 item 8; the stored snapshot 5b41aa9 predates that README text, so its
wording and stage lengths are not quoted here); the maintainer also writes that dCM "performs more stably
than sCM" in some cases (NVlabs/rcm issue #24). The official code runs one method per job; a later stage
is a new job whose `checkpoint.load_path` is the previous stage's checkpoint. With `load_training_state=False` (the
default, rcm/configs/defaults/checkpoint.py:30-31) only the weights load, student, EMA and fake score
(rcm/checkpointers/dcp.py:425-451, the model's state_dict at t2v_model_distill_rcm.py:984-992; NVlabs/rcm
5b41aa9), and the job starts at iteration 0 with new optimisers and LR schedulers.

rcmfn does the same inside one run, so that a staged run equals that chain of jobs. At a stage boundary:
- carried over: the student's and the fake score's weights (a fake score untouched by the stages before
  its first critic stage is still its initial copy, as the official non-strict load leaves it);
- restarted: the iteration that every schedule counts from (student / critic phases, the tangent
  warm-up rho and its sCM-only prefix H, the rollout-length cycle, the EMA's beta(i_eff), so the EMA
  starts again as a copy of the student), both AdamW states and the per-optimiser LR warm-up;
- not restarted: the per-iteration random draws (seeded by the run's iteration, rcmfn.loop), so a stage
  never repeats an earlier one's noise.
The restart is a pure function of the iteration, so a resume at any iteration, a boundary included,
continues bit for bit (tests/entrypoints/test_stages.py).
"""

from dataclasses import dataclass
from itertools import accumulate

import torch

from rcmfn.loop import BatchFn, LoopConfig, Networks, TrainState, train_iteration
from rcmfn.step import METHODS


@dataclass(frozen=True)
class Stage:
    """`iterations` iterations (student and critic together) of `method` (rcmfn.step.Method)."""

    method: str
    iterations: int

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} in stage {self}; valid: {', '.join(METHODS)}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"stage {self.method!r} needs a whole number of iterations >= 1; got {self.iterations!r}")


def parse_stages(text: str) -> tuple[Stage, ...]:
    """'dcm:2000,scm:3000,rcm:5000' -> the stages, in order; a ValueError names the part that is wrong."""
    if not text.strip():
        raise ValueError("--stages is empty; write method:iterations[,method:iterations...], e.g. dcm:500,rcm:2000")
    stages = []
    for part in text.split(","):
        method, colon, count = (s.strip() for s in part.partition(":"))
        if not colon:
            raise ValueError(f"stage {part.strip()!r} is not method:iterations (e.g. scm:3000)")
        if method not in METHODS:
            raise ValueError(f"stage {part.strip()!r}: unknown method {method!r}; valid: {', '.join(METHODS)}")
        try:
            iterations = int(count)
        except ValueError:
            raise ValueError(f"stage {part.strip()!r}: iterations {count!r} is not a whole number") from None
        if iterations < 1:
            raise ValueError(f"stage {part.strip()!r}: iterations must be >= 1; got {iterations}")
        stages.append(Stage(method, iterations))
    return tuple(stages)


def format_stages(stages: tuple[Stage, ...]) -> str:
    """The inverse of `parse_stages`."""
    return ",".join(f"{s.method}:{s.iterations}" for s in stages)


def stage_starts(stages: tuple[Stage, ...]) -> tuple[int, ...]:
    """The first iteration of each stage: 0, n_1, n_1 + n_2, ..."""
    return (0, *accumulate(s.iterations for s in stages[:-1]))


def total_iterations(stages: tuple[Stage, ...]) -> int:
    return sum(s.iterations for s in stages)


def stage_at(iteration: int, stages: tuple[Stage, ...]) -> tuple[int, int]:
    """(index, first iteration) of the stage that runs `iteration`; at the run's end (iteration = total),
    the last stage. Iteration k belongs to stage s iff start_s <= k < start_s + n_s."""
    total = total_iterations(stages)
    if not 0 <= iteration <= total:
        raise ValueError(f"iteration {iteration} lies outside the stages' 0..{total}")
    starts = stage_starts(stages)
    index = max(s for s, start in enumerate(starts) if start <= min(iteration, total - 1))
    return index, starts[index]


def method_at(iteration: int, stages: tuple[Stage, ...]) -> str:
    """The method iteration `iteration` trains with."""
    return stages[stage_at(iteration, stages)[0]].method


@torch.no_grad()
def restart_at_boundary(state: TrainState) -> None:
    """What a new stage restarts (module docstring): both AdamW states and their step counts (the LR
    warm-up), and the EMA, a copy of the student. The weights and the iteration are kept."""
    for opt in (state.student_opt, state.fake_opt):
        if opt is not None:
            opt.state.clear()  # AdamW creates its moments and step count afresh at its next step
    state.student_steps = state.critic_steps = 0
    for key, value in state.ema.items(include_nested=True, leaves_only=True):
        value.copy_(state.student.get(key).detach().to(value.dtype))


def staged_iteration(
    state: TrainState, nets: Networks, batch_fn: BatchFn, stages: tuple[Stage, ...], configs: tuple[LoopConfig, ...]
) -> dict:
    """`rcmfn.loop.train_iteration` with stage `s`'s settings `configs[s]`, restarting at a boundary first.

    One stage is a plain run: no restart, stage_start 0, the metrics of train_iteration unchanged.
    """
    if len(configs) != len(stages):
        raise ValueError(f"{len(stages)} stages need as many loop configurations; got {len(configs)}")
    if state.iteration >= total_iterations(stages):
        raise ValueError(f"iteration {state.iteration} is past the stages' {total_iterations(stages)} iterations")
    index, start = stage_at(state.iteration, stages)
    if index > 0 and state.iteration == start:
        restart_at_boundary(state)
    metrics = train_iteration(state, nets, batch_fn, configs[index], stage_start=start)
    return metrics if len(stages) == 1 else metrics | {"stage": index, "method": stages[index].method}


def stage_record(iteration: int, stages: tuple[Stage, ...]) -> dict:
    """What a checkpoint at `iteration` records: the stage its next iteration runs (the last at the end)."""
    index, start = stage_at(iteration, stages)
    return {"stage": index, "stage_method": stages[index].method, "stage_start": start}


def check_stage_record(meta: dict, stages: tuple[Stage, ...], where: str) -> None:
    """Refuse a checkpoint whose recorded stage is not the one these stages put at its iteration
    (checkpoints written before stages were recorded carry none and pass)."""
    if "stage" not in meta:
        return
    expected = stage_record(meta["iteration"], stages)
    if {k: meta[k] for k in expected} != expected:
        raise ValueError(
            f"checkpoint {where} records stage {meta['stage']} ({meta.get('stage_method')!r} from iteration "
            f"{meta.get('stage_start')}), but --stages {format_stages(stages)} puts iteration {meta['iteration']} "
            f"in stage {expected['stage']} ({expected['stage_method']!r} from {expected['stage_start']})"
        )
