"""`distill --expert high|low`: one expert of a two-expert model (Wan2.2 A14B) distilled over its own time range.

The choice of one student per expert, and how its run differs from a one-network run, is docs/toy.md "Two
experts": the teacher is that expert alone (its folder under --distributed.teacher, rcmfn/models/experts.py),
p_G and p_D are the preset's truncated to the expert's TrigFlow range (rcmfn.time.Truncated), the teacher's
CFG weight defaults to the expert's own (ExpertSwitch.guidance), and the low-noise expert's DMD / critic
rollouts start at the boundary from data renoised there (LossConfig.rollout_start), where the high-noise
expert hands over. The two runs' exports sample together through entrypoints/sample_experts.py.
"""

from dataclasses import replace
from pathlib import Path

from rcmfn.models.experts import expert_checkpoint
from rcmfn.models.registry import get_spec
from rcmfn.step import LossConfig
from rcmfn.time import Truncated


def check_expert(model: str, expert: str | None, require: bool = False) -> None:
    """A one-network model takes no --expert; with `require` (a run about to start) a two-expert model needs
    one: its experts are distilled one per run."""
    experts = None if model == "toy" else get_spec(model).experts
    if expert is not None and experts is None:
        raise ValueError(f"--expert {expert}: model {model!r} has one network, not two experts")
    if require and expert is None and experts is not None:
        raise ValueError(f"model {model!r} has two experts: distil one per run with --expert high or --expert low")


def expert_loss(loss: LossConfig, model: str, expert: str | None, guidance: float | None) -> LossConfig:
    """`loss` for one expert's run: truncated time distributions, the expert's guidance unless --guidance,
    and the low expert's rollout start at the boundary. Unchanged without --expert."""
    if expert is None:
        return loss
    switch = get_spec(model).experts
    lo, hi = switch.trig_range(expert)
    return replace(
        loss,
        guidance=switch.guidance(expert) if guidance is None else guidance,
        p_G=Truncated(loss.p_G, lo, hi),
        p_D=Truncated(loss.p_D, lo, hi),
        rollout_start=hi if expert == "low" else None,
    )


def expert_teacher(teacher: Path, layout: str, model: str, expert: str | None) -> Path:
    """The checkpoint a run's teacher loads: --distributed.teacher itself, or its expert's folder."""
    if expert is None or get_spec(model).experts is None:
        return teacher
    return expert_checkpoint(teacher, layout, expert)
