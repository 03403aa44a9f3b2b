"""Time domains of rCM and the training-time distributions.

Three clocks describe the same noise level (SPEC-rcm §1.1, sigma_data = 1):
  rectified-flow time r in [0, 1]   x_r = (1 - r) x0 + r eps
  EDM sigma in [0, inf)             sigma = r / (1 - r)
  TrigFlow time t in [0, pi/2]      x_t = cos t x0 + sin t eps, sigma = tan t
All maps are elementwise and keep the input dtype; callers pass float64 where precision matters.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch

TimeDomain = Literal["trig", "sigma", "rf"]


def rf_to_sigma(r: torch.Tensor) -> torch.Tensor:
    """sigma = r / (1 - r), with r clamped below 1 so r = 1 maps to a finite sigma. SPEC-rcm §1.1."""
    r = r.clamp(0.0, 1.0 - torch.finfo(r.dtype).eps)
    return r / (1.0 - r)


def sigma_to_rf(sigma: torch.Tensor) -> torch.Tensor:
    """r = sigma / (sigma + 1). SPEC-rcm §1.1."""
    return sigma / (sigma + 1.0)


def sigma_to_trig(sigma: torch.Tensor) -> torch.Tensor:
    """t = atan(sigma). SPEC-rcm §1.1."""
    return torch.atan(sigma)


def trig_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """sigma = tan(t). SPEC-rcm §1.1."""
    return torch.tan(t)


def rf_to_trig(r: torch.Tensor) -> torch.Tensor:
    """t = atan2(r, 1 - r): the SNR-matched TrigFlow time, exact at r = 1 (t = pi/2). SPEC-rcm §1.1."""
    return torch.atan2(r, 1.0 - r)


def trig_to_rf(t: torch.Tensor) -> torch.Tensor:
    """r = sin t / (sin t + cos t). SPEC-rcm §1.1 (derived)."""
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def shift_rf_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift s*u / (1 + (s - 1) u) on rectified-flow time; identity for s <= 0. SPEC-rcm §1.1."""
    if shift <= 0:
        return u
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_rf_time(r: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of `shift_rf_time`: u = r / (s - (s - 1) r). SPEC-rcm §6.2."""
    if shift <= 0:
        return r
    return r / (shift - (shift - 1.0) * r)


@dataclass(frozen=True)
class LogNormal:
    """log sigma ~ N(p_mean, p_std^2): p_G of sCM/rCM and the paper's p_D for Cosmos. SPEC-rcm §1.1."""

    p_mean: float = -0.8
    p_std: float = 1.6


@dataclass(frozen=True)
class UniformShift:
    """u ~ U[0, 1), r = shift(u, s): the Wan configs' p_D (s = 5). SPEC-rcm §1.1."""

    shift: float = 5.0


@dataclass(frozen=True)
class Truncated:
    """`base` conditioned on TrigFlow time t in [t_min, t_max]: the time distribution of one expert of a
    two-expert model trained over its own range (rcmfn/switch.py; docs/toy.md "Two experts"). Drawn by
    inverse CDF within the range, so no draw is rejected and the in-range shape of `base` is kept."""

    base: "LogNormal | UniformShift"
    t_min: float = 0.0
    t_max: float = math.pi / 2

    def __post_init__(self):
        if isinstance(self.base, Truncated):
            raise TypeError("Truncated.base must be LogNormal or UniformShift, not another Truncated")
        if not 0.0 <= self.t_min < self.t_max <= math.pi / 2:
            raise ValueError(f"need 0 <= t_min < t_max <= pi/2; got [{self.t_min}, {self.t_max}]")


TimeDistribution = LogNormal | UniformShift
"""The distributions a command line chooses among; `Truncated` ones are built from them in code."""


def convert_from_sigma(sigma: torch.Tensor, domain: TimeDomain) -> torch.Tensor:
    """Express sigma in the requested domain."""
    if domain == "sigma":
        return sigma
    if domain == "trig":
        return sigma_to_trig(sigma)
    if domain == "rf":
        return sigma_to_rf(sigma)
    raise ValueError(f"unknown time domain {domain!r}; expected 'trig', 'sigma' or 'rf'")


def sample_time(
    dist: TimeDistribution | Truncated,
    n: int,
    generator: torch.Generator | None = None,
    domain: TimeDomain = "trig",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw n float64 training times from `dist`, returned in `domain`. SPEC-rcm §1.1.

    The draw itself is float32 (randn / rand) then cast to float64, as the official code does, so the
    same generator state gives the same times as it. It runs on the generator's device and is moved to
    `device`, so a CPU generator gives the same times on every device.
    """
    draw_device = generator.device if generator is not None else device
    if isinstance(dist, Truncated):
        return _sample_truncated(dist, n, generator, domain, device)
    if isinstance(dist, LogNormal):
        normal = torch.randn(n, generator=generator, device=draw_device, dtype=torch.float32).double().to(device)
        sigma = torch.exp(dist.p_mean + dist.p_std * normal)
        return convert_from_sigma(sigma, domain)
    if isinstance(dist, UniformShift):
        u = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float32).double().to(device)
        r = shift_rf_time(u, dist.shift)
        if domain == "rf":
            return r
        if domain == "trig":
            return rf_to_trig(r)
        return rf_to_sigma(r)
    raise TypeError(f"unknown time distribution {dist!r}; expected LogNormal or UniformShift")


def _sample_truncated(dist: Truncated, n: int, generator, domain: TimeDomain, device) -> torch.Tensor:
    """u ~ U[F(t_min), F(t_max)) pushed through the base's inverse CDF F^-1 (float32 draw, float64 after)."""
    draw_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float32).double().to(device)
    lo, hi = torch.tensor([dist.t_min, dist.t_max], dtype=torch.float64, device=device)
    base = dist.base
    if isinstance(base, LogNormal):  # CDF in z = (log sigma - mean) / std, sigma = tan t
        to_z = lambda t: (torch.log(torch.tan(t)) - base.p_mean) / base.p_std  # noqa: E731
        c_lo, c_hi = torch.special.ndtr(to_z(lo)), torch.special.ndtr(to_z(hi))
        z = torch.special.ndtri(c_lo + u * (c_hi - c_lo))
        return convert_from_sigma(torch.exp(base.p_mean + base.p_std * z), domain)
    if isinstance(base, UniformShift):  # CDF is the unshifted u itself
        u_lo, u_hi = (unshift_rf_time(trig_to_rf(t), base.shift) for t in (lo, hi))
        r = shift_rf_time(u_lo + u * (u_hi - u_lo), base.shift)
        return {"rf": r, "trig": rf_to_trig(r), "sigma": rf_to_sigma(r)}[domain]
    raise TypeError(f"unknown time distribution {base!r}; expected LogNormal or UniformShift")


def check_trig_time(t: torch.Tensor, name: str = "t", allow_endpoints: bool = False) -> None:
    """Raise ValueError naming `name` if any TrigFlow time lies outside (0, pi/2) or is not finite."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite TrigFlow times: {t.flatten()[:8].tolist()}")
    lo, hi = t.min().item(), t.max().item()
    slack = 2 * torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0  # float32(pi/2) > pi/2
    ok = (lo >= 0.0 and hi <= math.pi / 2 + slack) if allow_endpoints else (lo > 0.0 and hi < math.pi / 2)
    if not ok:
        bounds = "[0, pi/2]" if allow_endpoints else "(0, pi/2)"
        raise ValueError(f"{name} must lie in {bounds}; got values in [{lo:.6g}, {hi:.6g}]")
