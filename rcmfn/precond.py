"""TrigFlow preconditioning of a rectified-flow (velocity) network.

Every network in rCM (teacher, student, fake score) is a raw velocity predictor
`net(params, x_in, c_noise, cond) -> v`; wrapping it gives the one signature the rest of rcmfn uses,
`denoise(params, x_t, t, cond) -> F` (TrigFlow velocity, SPEC-rcm §1.2). x0 follows from F as
x0 = cos t x_t - sin t F.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

VelocityNet = Callable[..., torch.Tensor]
Denoiser = Callable[..., torch.Tensor]

TIME_SCALE = 1000.0  # rectified-flow nets take 1000 * r as their timestep (SPEC-rcm §1.2).


@dataclass(frozen=True)
class TrigFlowCoefficients:
    """c_skip, c_out, c_in, c_noise of the RF -> TrigFlow wrapper, float64, shaped like t."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def trigflow_coefficients(t: torch.Tensor) -> TrigFlowCoefficients:
    """Wrapper coefficients at TrigFlow time t, in float64. SPEC-rcm §1.2 (table)."""
    t = t.double()
    denom = torch.cos(t) + torch.sin(t)
    return TrigFlowCoefficients(
        c_skip=1.0 / denom,
        c_out=-torch.sin(t) / denom,
        c_in=1.0 / denom,
        c_noise=TIME_SCALE * torch.sin(t) / denom,
    )


def batch_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample [B] time so it broadcasts against x of shape [B, ...]."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """x0 = cos t x_t - sin t F (TrigFlow, SPEC-rcm §1.2). t is [B]."""
    tb = batch_view(t, x_t)
    return torch.cos(tb) * x_t - torch.sin(tb) * F


def velocity_from_x0(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """F = (cos t x_t - x0) / sin t (TrigFlow, SPEC-rcm §1.2); undefined at t = 0."""
    tb = batch_view(t, x_t)
    return (torch.cos(tb) * x_t - x0) / torch.sin(tb)


def noise_from_velocity(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """eps = sin t x_t + cos t F, the noise implied by a TrigFlow velocity (derived)."""
    tb = batch_view(t, x_t)
    return torch.sin(tb) * x_t + torch.cos(tb) * F


def check_batch(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> None:
    """Static shape checks shared by every denoiser call (safe under torch.compile)."""
    if t.dim() != 1 or t.shape[0] != x_t.shape[0]:
        raise ValueError(f"time must have shape [B] = [{x_t.shape[0]}] matching x; got {tuple(t.shape)}")
    if cond is not None and cond.shape[0] != x_t.shape[0]:
        raise ValueError(
            f"shape mismatch between x and condition: x has batch {x_t.shape[0]} "
            f"(shape {tuple(x_t.shape)}), condition has batch {cond.shape[0]} (shape {tuple(cond.shape)})"
        )


def trigflow_denoiser(
    net: VelocityNet,
    net_dtype: torch.dtype | None = None,
    time_dtype: torch.dtype | None = None,
) -> Denoiser:
    """Wrap a velocity net v(params, x_in, c_noise, cond) as denoise(params, x_t, t, cond) -> F.

    SPEC-rcm §1.2. The net sees c_in x_t in `net_dtype` (default: x_t's dtype) and c_noise = 1000 r in
    `time_dtype` (default: float32, or float64 for a float64 net input -- the paper's "high-precision
    time"; bfloat16 reproduces the official numerics, §8.4). F is formed in float64 from the
    closed form F = ((cos t - sin t) x_t + v) / (cos t + sin t), finite at t = 0, then cast back to
    x_t's dtype on the last line.
    """

    def denoise(params, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        check_batch(x_t, t, cond)
        coeffs = trigflow_coefficients(t)
        c_in = batch_view(coeffs.c_in, x_t)
        x_in = (c_in * x_t.double()).to(net_dtype or x_t.dtype)
        c_noise = coeffs.c_noise.to(time_dtype or torch.promote_types(x_in.dtype, torch.float32))
        velocity = net(params, x_in, c_noise, cond)
        tb = batch_view(t.double(), x_t)
        F = ((torch.cos(tb) - torch.sin(tb)) * x_t.double() + velocity.double()) * c_in
        return F.to(x_t.dtype)

    return denoise


def check_guidance(guidance: float, name: str = "guidance") -> float:
    """`guidance` as a float if it is a usable CFG weight w: finite and >= 1 (1 = conditional only).

    Guidance applies only when w > 1, the official rule (NVlabs/rcm rcm/models/t2v_model_distill_rcm.py:520,
    :624, :657, `if self.config.teacher_guidance > 1.0`); w < 1 would extrapolate away from the condition,
    so it is refused rather than silently ignored. `name` is the flag or field the error names.
    """
    value = float(guidance)
    if not math.isfinite(value) or value < 1.0:
        raise ValueError(
            f"{name}: guidance scale must be finite and >= 1 (the standard CFG weight w of "
            f"F_u + w (F_c - F_u); 1 = no guidance); got {guidance}"
        )
    return value


def standard_guidance_from_cosmos(g: float) -> float:
    """The standard CFG weight w equal to Cosmos-Predict2's guidance g: w = g + 1.

    Cosmos applies guidance as x0_c + g (x0_c - x0_u) (nvidia-cosmos/cosmos-predict2
    cosmos_predict2/pipelines/text2image.py:462, video2world.py:777), which is x0_u + (g + 1)(x0_c - x0_u);
    rcmfn's `guidance` is always the standard w (docs/guidance.md). E.g. the Cosmos T2I pipeline's default
    g = 4 is w = 5.
    """
    return float(g) + 1.0


def guided_velocity(
    denoise: Denoiser,
    params,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """Classifier-free guided TrigFlow velocity F_u + w (F_c - F_u), w the standard weight. SPEC-rcm §2.3.

    CFG on F equals CFG on x0 and on the raw velocity (all affine with the same x_t term, §1.2), so
    this one function serves sCM targets, DMD's real score and the teacher sampler. Two separate
    passes, as in the official code, and only when w > 1 (`check_guidance`); w = 1 or no uncondition
    gives the conditional velocity alone.
    """
    guidance = check_guidance(guidance)
    F_cond = denoise(params, x_t, t, cond)
    if uncond is None or guidance <= 1.0:
        return F_cond
    if uncond.shape != cond.shape:
        raise ValueError(f"uncondition shape {tuple(uncond.shape)} must equal condition shape {tuple(cond.shape)}")
    F_uncond = denoise(params, x_t, t, uncond)
    return F_uncond + guidance * (F_cond - F_uncond)
