"""Samplers: the few-step consistency sampler of the student and the teacher's Euler sampler.

SPEC-rcm §6. Both take their noise as an argument (a seeded draw made by the caller) and run in
float64 arithmetic between network calls.
"""

import math

import torch

from rcmfn.precond import Denoiser, batch_view, guided_velocity
from rcmfn.rollout import BACKWARD_TIMESTEPS, consistency_rollout
from rcmfn.time import rf_to_trig, shift_rf_time, sigma_to_rf, unshift_rf_time

# Mid times of the paper's evaluation grid [atan sigma_max, 1.3, 1.0, 0.6] (rCM paper, App. D "Evaluation
# Details"; first k entries for fewer steps), also the Cosmos-Predict2 distilled sampler's: EDM sigmas
# 3.6, 1.5574, 0.684 (nvidia-cosmos/cosmos-predict2 cosmos_predict2/pipelines/text2image.py:400) are trig
# times atan(sigma) = 1.2998, 1.0000, 0.6000. The official Wan inference script uses BACKWARD_TIMESTEPS
# (1.5, 1.4, 1.0) instead (NVlabs/rcm rcm/inference/wan2pt1_t2v_rcm_infer.py:145, the paper grid
# commented out on line 143).
PAPER_MID_TIMES = (1.3, 1.0, 0.6)


def consistency_times(
    steps: int, sigma_max: float = 80.0, mid_times: tuple[float, ...] = BACKWARD_TIMESTEPS
) -> torch.Tensor:
    """Float64 grid [atan sigma_max, m_1, ..., m_{steps-1}, 0]. SPEC-rcm §6.1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if len(mid_times) < steps - 1:
        raise ValueError(f"{steps} steps need {steps - 1} mid times; got {tuple(mid_times)}")
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be positive; got {sigma_max}")
    grid = [math.atan(sigma_max), *[float(m) for m in mid_times[: steps - 1]], 0.0]
    if any(b > a for a, b in zip(grid, grid[1:], strict=False)):
        raise ValueError(f"sampling times must be non-increasing; got {grid}")
    return torch.tensor(grid, dtype=torch.float64)


@torch.no_grad()
def consistency_sample(
    denoise: Denoiser, params, noise: torch.Tensor, times: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """Few-step student sample: noise [steps, B, ...] (start state, then fresh noises), times from
    `consistency_times`. The start state is unit noise, not scaled by sin t_0 (as officially).
    NaNs are replaced by 0 at the end. SPEC-rcm §6.1."""
    return torch.nan_to_num(consistency_rollout(denoise, params, noise, times, cond), nan=0.0)


def teacher_rf_times(steps: int, shift: float = 5.0, sigma_max: float = 80.0) -> torch.Tensor:
    """Shifted rectified-flow grid of steps + 1 points from r_max = sigma_max / (1 + sigma_max) to 0.

    SPEC-rcm §6.2: u_max = unshift(r_max), linspace(u_max, 0, steps + 1) without its last point,
    each shifted, then a final 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    r_max = sigma_to_rf(torch.tensor(float(sigma_max), dtype=torch.float64))
    u = torch.linspace(float(unshift_rf_time(r_max, shift)), 0.0, steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_rf_time(u, shift), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def teacher_euler_sample(
    denoise: Denoiser,
    params,
    noise: torch.Tensor,
    rf_times: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Euler on the teacher's rectified-flow ODE, x <- x + (r_next - r) v, with CFG. SPEC-rcm §6.2.

    The RF velocity is recovered from the TrigFlow denoiser: at r, t = atan2(r, 1 - r), x_t = x_r (cos t
    + sin t), and v = eps_hat - x0_hat = (sin t - cos t) x_t + (cos t + sin t) F (derived).
    """
    x = noise.double()
    batch = x.shape[0]
    for r, r_next in zip(rf_times[:-1].tolist(), rf_times[1:].tolist(), strict=True):
        t = rf_to_trig(torch.full((batch,), r, dtype=torch.float64, device=x.device))
        tb = batch_view(t, x)
        scale = torch.cos(tb) + torch.sin(tb)
        x_t = x * scale
        F = guided_velocity(denoise, params, x_t.to(noise.dtype), t, cond, uncond, guidance).double()
        velocity = (torch.sin(tb) - torch.cos(tb)) * x_t + scale * F
        x = x + (r_next - r) * velocity
    return x.to(noise.dtype)
