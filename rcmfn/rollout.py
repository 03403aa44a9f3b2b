"""Backward simulation: the student's few-step generation used by DMD and the fake-score step.

SPEC-rcm §3.2 and §6.1: from pure noise at t_1 = pi/2, each step predicts x0 and re-noises it to the
next time; the last prediction is the sample. Only the last step may carry a graph, so a DMD gradient
flows through one network call whatever the number of steps (the last step's input is a constant).
"""

import math

import torch

from rcmfn.precond import Denoiser, batch_view, x0_from_velocity
from rcmfn.time import TimeDistribution, Truncated, check_trig_time, sample_time

BACKWARD_TIMESTEPS = (1.5, 1.4, 1.0)  # official mid times, SPEC-rcm §3.2 / §6.1


def rollout_times(
    num_steps: int,
    batch: int,
    p_D: TimeDistribution | Truncated | None = None,
    generator: torch.Generator | None = None,
    fixed_times: tuple[float, ...] | None = None,
    device: torch.device | str = "cpu",
    start: float = math.pi / 2,
) -> torch.Tensor:
    """[num_steps + 1, B] float64 times for a rollout: `start` (pi/2), then draws from p_D, then 0.

    SPEC-rcm §3.2: t_n = min(t_hat_n, t_{n-1}) with t_hat_n ~ p_D (a running minimum, so monotone
    non-increasing), or `fixed_times[n - 2]` for every sample when given (dmd_fix_timesteps).
    t_1 is exactly pi/2 (the official code stores float32 pi/2, 4e-8 larger; immaterial).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    if fixed_times is not None and len(fixed_times) < num_steps - 1:
        raise ValueError(f"{num_steps} steps need {num_steps - 1} fixed mid times; got {fixed_times}")
    if fixed_times is None and p_D is None and num_steps > 1:
        raise ValueError("a rollout of more than one step needs p_D or fixed_times")
    times = [torch.full((batch,), start, dtype=torch.float64, device=device)]
    for n in range(1, num_steps):
        if fixed_times is not None:
            draw = torch.full((batch,), float(fixed_times[n - 1]), dtype=torch.float64, device=device)
        else:
            draw = sample_time(p_D, batch, generator, domain="trig", device=device)
        times.append(torch.minimum(draw, times[-1]))
    times.append(torch.zeros(batch, dtype=torch.float64, device=device))
    return torch.stack(times)


def consistency_rollout(
    denoise: Denoiser,
    params,
    noise: torch.Tensor,
    times: torch.Tensor,
    cond: torch.Tensor,
) -> torch.Tensor:
    """x0 after len(times) - 1 consistency steps; graph (if grad is on) through the last step only.

    SPEC-rcm §3.2 / §6.1. noise: [N, B, ...] with noise[0] the start state and noise[k] the fresh noise
    of re-noising step k; times: [N + 1] (shared) or [N + 1, B] float64, ending in 0.
    """
    num_steps = times.shape[0] - 1
    if noise.shape[0] < num_steps:
        raise ValueError(f"{num_steps} steps need noise of leading size >= {num_steps}; got {noise.shape[0]}")
    if not torch.compiler.is_compiling():
        check_trig_time(times, "rollout times", allow_endpoints=True)
    batch = noise.shape[1]
    times = times.double()
    if times.dim() == 1:
        times = times[:, None].expand(-1, batch)
    x = noise[0]
    for k in range(num_steps):
        last = k == num_steps - 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and last):
            x0 = x0_from_velocity(x.double(), times[k], denoise(params, x, times[k], cond).double())
            x0 = x0.to(noise.dtype)
        if not last:
            t_next = batch_view(times[k + 1], x0)
            x = (torch.cos(t_next) * x0.double() + torch.sin(t_next) * noise[k + 1].double()).to(noise.dtype)
    return x0
