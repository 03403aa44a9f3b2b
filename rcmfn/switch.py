"""Two experts switched at a boundary time: a denoiser that is a piecewise function of time, and samplers
whose network (and guidance) changes at the boundary.

Wan2.2 A14B denoises with a high-noise expert for timesteps t >= boundary * 1000 and a low-noise expert
below (Wan-Video/Wan2.2 wan/text2video.py `_prepare_model_for_timestep`: `if t.item() >= boundary`, with
`boundary = self.boundary * self.num_train_timesteps` in `generate`; diffusers WanPipeline: `transformer`
for t >= boundary_ratio * num_train_timesteps, `transformer_2` below, pipeline_wan.py:585-604), each with
its own CFG weight (`sample_guide_scale = (low, high)`, wan/configs/wan_t2v_A14B.py; diffusers
`guidance_scale` / `guidance_scale_2`). The released rCM students of Wan2.2 are a pair too, switched at the
same kind of boundary in rectified-flow time (NVlabs/rcm rcm/inference/wan2pt2_i2v_rcm_infer.py: high-noise
net while r >= boundary). Here the boundary is compared in rectified-flow time r = 1000-step timestep / 1000.

A switched denoiser takes `params = {"high": ..., "low": ...}` and routes each sample by its own time, so
one batch may mix both experts (training draws times per sample); each sample runs through one expert only.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rcmfn.precond import Denoiser, check_guidance
from rcmfn.samplers import teacher_euler_sample
from rcmfn.time import trig_to_rf

EXPERTS = ("high", "low")


@dataclass(frozen=True)
class ExpertSwitch:
    """Where a two-expert model switches, and each expert's sampler guidance (standard CFG weight w)."""

    boundary: float
    """rectified-flow time r_b in (0, 1): the high-noise expert runs for r >= r_b (timestep >= 1000 r_b)"""
    guidance_high: float = 1.0
    """CFG weight of the high-noise expert's sampler"""
    guidance_low: float = 1.0
    """CFG weight of the low-noise expert's sampler"""

    def __post_init__(self):
        if not 0.0 < self.boundary < 1.0:
            raise ValueError(f"ExpertSwitch.boundary must lie in (0, 1) (rectified-flow time); got {self.boundary}")
        check_guidance(self.guidance_high, "ExpertSwitch.guidance_high")
        check_guidance(self.guidance_low, "ExpertSwitch.guidance_low")

    @property
    def trig_boundary(self) -> float:
        """The boundary as TrigFlow time atan2(r_b, 1 - r_b) (0.875 -> atan 7 = 1.4289)."""
        return math.atan2(self.boundary, 1.0 - self.boundary)

    def trig_range(self, expert: str) -> tuple[float, float]:
        """[lo, hi] TrigFlow times of `expert` ("high": [t_b, pi/2], "low": [0, t_b])."""
        if expert not in EXPERTS:
            raise ValueError(f"unknown expert {expert!r}; valid: {EXPERTS}")
        return (self.trig_boundary, math.pi / 2) if expert == "high" else (0.0, self.trig_boundary)

    def guidance(self, expert: str) -> float:
        if expert not in EXPERTS:
            raise ValueError(f"unknown expert {expert!r}; valid: {EXPERTS}")
        return self.guidance_high if expert == "high" else self.guidance_low


def is_high_noise(switch: ExpertSwitch, t: torch.Tensor) -> torch.Tensor:
    """Boolean [B]: which samples at TrigFlow time t belong to the high-noise expert (r >= r_b)."""
    return trig_to_rf(t.double()) >= switch.boundary


def _check_params(params) -> None:
    if not isinstance(params, Mapping) and not hasattr(params, "keys"):
        raise TypeError(f"a switched denoiser takes params {{'high': ..., 'low': ...}}; got {type(params).__name__}")
    missing = [k for k in EXPERTS if k not in params.keys()]
    if missing:
        raise KeyError(f"switched denoiser params lack expert(s) {missing}; have {sorted(params.keys())}")


def switched_denoiser(high: Denoiser, low: Denoiser, switch: ExpertSwitch) -> Denoiser:
    """denoise(params, x_t, t, cond) = high(params["high"], ...) where r(t) >= r_b, low(params["low"], ...)
    elsewhere, each sample through one expert (a batch of one expert calls only that one)."""

    def denoise(params, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        _check_params(params)
        mask = is_high_noise(switch, t)
        if bool(mask.all()):
            return high(params["high"], x_t, t, cond)
        if not bool(mask.any()):
            return low(params["low"], x_t, t, cond)
        idx_high, idx_low = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
        part = lambda c, idx: None if c is None else c[idx]  # noqa: E731
        F_high = high(params["high"], x_t[idx_high], t[idx_high], part(cond, idx_high))
        F_low = low(params["low"], x_t[idx_low], t[idx_low], part(cond, idx_low))
        order = torch.argsort(torch.cat([idx_high, idx_low]))
        return torch.cat([F_high, F_low.to(F_high.dtype)])[order]

    return denoise


def split_rf_grid(rf_times: torch.Tensor, switch: ExpertSwitch) -> tuple[torch.Tensor, torch.Tensor]:
    """A decreasing RF grid cut into (high part, low part) sharing the switch point: step r_i -> r_{i+1}
    belongs to the expert of r_i (as the official samplers pick the net by the current timestep). Either
    part may be a single point (no steps)."""
    high_steps = int((rf_times[:-1] >= switch.boundary).sum())
    return rf_times[: high_steps + 1], rf_times[high_steps:]


@torch.no_grad()
def switched_teacher_euler_sample(
    experts: Mapping[str, tuple[Denoiser, object]],
    switch: ExpertSwitch,
    noise: torch.Tensor,
    rf_times: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher Euler (rcmfn.samplers.teacher_euler_sample) with `experts` {"high": (denoise, params),
    "low": (...)}: the high expert and its guidance over the grid's r >= r_b steps, then the low one."""
    high_grid, low_grid = split_rf_grid(rf_times, switch)
    x = noise
    for name, grid in (("high", high_grid), ("low", low_grid)):
        if grid.shape[0] > 1:
            denoise, params = experts[name]
            x = teacher_euler_sample(denoise, params, x, grid, cond, uncond, switch.guidance(name))
    return x


def expert_steps(times: torch.Tensor, switch: ExpertSwitch) -> list[str]:
    """Which expert takes each step of a consistency grid [t_0, ..., 0] (trig times): by the step's start."""
    return [
        "high" if trig_to_rf(torch.tensor(float(t), dtype=torch.float64)) >= switch.boundary else "low"
        for t in times[:-1]
    ]
