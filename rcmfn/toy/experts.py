"""A two-expert analytic teacher on the toy: the exact mixture velocity below the boundary and the exact
velocity of a deliberately different mixture above it, so that the experts genuinely differ.

The high-noise expert is the exact teacher of `high_noise_mixture(mixture)`: the same modes and text, but
each class's mode weights re-drawn as w^-power (renormalised), so the heavy modes become the light ones.
At high noise the velocity decides which mode a trajectory heads for, so the switched teacher's samples
land on the true modes (the low expert resolves them) with the high expert's mode weights: a target
neither expert's own data distribution has, as Wan2.2's pair decides layout and detail separately.
"""

import dataclasses

import torch

from rcmfn.precond import TIME_SCALE, trigflow_denoiser
from rcmfn.switch import ExpertSwitch, switched_denoiser
from rcmfn.time import TimeDistribution, sample_time
from rcmfn.toy import gmm
from rcmfn.toy.warm_start import draw_labels


def high_noise_mixture(mixture: gmm.GaussianMixture, power: float = 3.0) -> gmm.GaussianMixture:
    """`mixture` with mode weights w_k^-power / sum_j w_j^-power per class (means, stds, text kept)."""
    log_weights = torch.log_softmax(-power * mixture.log_weights, dim=-1)
    return dataclasses.replace(mixture, log_weights=log_weights)


def expert_mixtures(mixture: gmm.GaussianMixture, power: float = 3.0) -> dict[str, gmm.GaussianMixture]:
    """The switched teacher's params: {"high": the re-weighted mixture, "low": `mixture`}."""
    return {"high": high_noise_mixture(mixture, power), "low": mixture}


def switched_teacher(switch: ExpertSwitch):
    """The two-expert analytic teacher as a denoiser over `expert_mixtures(...)`."""
    exact = trigflow_denoiser(gmm.velocity, time_dtype=torch.float64)
    return switched_denoiser(exact, exact, switch)


def switched_velocity(experts: dict, switch: ExpertSwitch, x_r: torch.Tensor, r: torch.Tensor, labels):
    """The exact RF velocity of the switched teacher at (x_r, r): high expert's where r >= r_b."""
    high = gmm.posterior_velocity(experts["high"], x_r, r, labels)
    low = gmm.posterior_velocity(experts["low"], x_r, r, labels)
    mask = (r >= switch.boundary).reshape(-1, *[1] * (x_r.dim() - 1))
    return torch.where(mask, high, low)


def switched_batch_fn(
    experts: dict,
    switch: ExpertSwitch,
    batch_size: int,
    time_dist: TimeDistribution,
    null_fraction: float = 0.1,
):
    """batch_fn(generator, dtype) -> (x_r, c_noise, cond, v*) for rcmfn.toy.warm_start.fit_velocity: x0 from
    the low expert's mixture (the data), v* the switched teacher's exact velocity."""
    data = experts["low"]

    def batch_fn(gen: torch.Generator, dtype: torch.dtype):
        labels = draw_labels(data, batch_size, null_fraction, gen)
        x0 = gmm.sample_mixture(data, labels, gen)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        r = sample_time(time_dist, batch_size, generator=gen, domain="rf")
        rb = r.reshape(-1, 1, 1, 1, 1)
        x_r = (1.0 - rb) * x0 + rb * eps
        target = switched_velocity(experts, switch, x_r, r, labels)
        cond = gmm.class_embeddings(data, labels)
        return x_r.to(dtype), (TIME_SCALE * r).to(dtype), cond.to(dtype), target.to(dtype)

    return batch_fn
