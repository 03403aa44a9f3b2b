"""The alternating student / critic schedule and the learning-rate warm-up.

SPEC-rcm §4.2 (0-based iterations, as the official code) and §4.3.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """What the loop carries to decide phases: tangent warm-up H and student update frequency F."""

    warmup_iterations: int = 0
    student_update_freq: int = 5
    has_critic: bool = True

    def __post_init__(self):
        if self.warmup_iterations < 0:
            raise ValueError(f"warmup_iterations must be >= 0; got {self.warmup_iterations}")
        if self.student_update_freq < 1:
            raise ValueError(f"student_update_freq must be >= 1; got {self.student_update_freq}")


def is_student_phase(i: int, schedule: Schedule) -> bool:
    """Student step iff no critic, or i < H, or (i - H) mod F == 0; otherwise a critic step. §4.2."""
    H, F = schedule.warmup_iterations, schedule.student_update_freq
    return (not schedule.has_critic) or i < H or (i - H) % F == 0


def effective_student_iteration(i: int, schedule: Schedule) -> int:
    """Student steps done before iteration i: i_eff = i (no critic or i < H) else H + floor((i - H)/F)."""
    H, F = schedule.warmup_iterations, schedule.student_update_freq
    if not schedule.has_critic or i < H:
        return i
    return H + (i - H) // F


def critic_iteration(i: int, schedule: Schedule) -> int:
    """Critic steps done before iteration i: i - i_eff - 1 (valid in a critic phase). §4.1."""
    return i - effective_student_iteration(i, schedule) - 1


def rollout_steps(counter: int, max_steps: int = 4) -> int:
    """Deterministic rollout length cycle 1, 2, ..., max_steps, 1, ... (counter mod max + 1). §3.1."""
    return counter % max_steps + 1


def lr_warmup_factor(optimizer_step: int, warmup_steps: int = 100, start: float = 1e-6) -> float:
    """LR multiplier: linear from `start` to 1 over that optimiser's first `warmup_steps`, then 1. §4.3."""
    if warmup_steps <= 0 or optimizer_step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * optimizer_step / warmup_steps
