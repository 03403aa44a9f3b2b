"""A distilled student's sampler settings as one value: what any few-step sampler of it needs.

SPEC-rcm §6.1: the student samples on the TrigFlow grid [atan sigma_max, m_1, ..., m_{k-1}, 0]
(`rcmfn.samplers.consistency_times`), predicting x0 and re-noising to the next time. It runs without CFG
(the teacher's guidance is distilled into it) and without a timestep shift (the grid is its own). The same
value fills the exported model card (rcmfn/models/model_card.py) and the diffusers scheduler
(rcmfn/diffusers_scheduler.py), so both say what `entrypoints.sample` does.
"""

import math
from dataclasses import dataclass

import torch

from rcmfn.rollout import BACKWARD_TIMESTEPS
from rcmfn.samplers import consistency_times
from rcmfn.time import trig_to_rf


@dataclass(frozen=True)
class FewStepSettings:
    """sigma_max and mid times of the student's sampler (a model preset's `sigma_max`, `mid_times`)."""

    sigma_max: float = 80.0
    """start noise level: the first time is atan(sigma_max)"""
    mid_times: tuple[float, ...] = BACKWARD_TIMESTEPS
    """TrigFlow times between the start and 0; k steps use the first k - 1"""

    def __post_init__(self):
        consistency_times(len(self.mid_times) + 1, self.sigma_max, self.mid_times)  # names a bad value

    @property
    def max_steps(self) -> int:
        return len(self.mid_times) + 1

    def trig_times(self, steps: int) -> torch.Tensor:
        """Float64 [steps + 1] TrigFlow grid ending in 0."""
        if steps > self.max_steps:
            raise ValueError(f"{steps} steps need {steps - 1} mid times; these settings have {self.mid_times}")
        return consistency_times(steps, self.sigma_max, self.mid_times)

    def rf_times(self, steps: int) -> torch.Tensor:
        """Float64 [steps] rectified-flow times r = sin t / (sin t + cos t) of the network calls."""
        return trig_to_rf(self.trig_times(steps)[:-1])


def describe_grid(settings: FewStepSettings, steps: int, timestep_scale: float) -> str:
    """One line: the TrigFlow times of a `steps`-step sample, their sigmas and the net's timestep inputs."""
    times = settings.trig_times(steps)[:-1].tolist()
    trig = [round(t, 4) for t in times]
    sigmas = [round(math.tan(t), 3) for t in times]
    timesteps = [round(timestep_scale * float(r), 3) for r in settings.rf_times(steps)]
    plural = "s" if steps > 1 else ""
    return f"{steps} step{plural}: TrigFlow times {trig} (sigma {sigmas}), network timesteps {timesteps}"
