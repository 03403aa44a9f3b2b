"""Warm start: fit a velocity net to the analytic teacher's velocity field by flow matching.

SPEC-rcm §1.1-§1.2 (rectified flow x_r = (1-r) x0 + r eps; nets take 1000 r). rCM starts the student
and the fake score from the teacher's weights; the toy has no teacher weights, so this regresses a net
onto the exact teacher velocity v*(x_r, r, c) = E[eps - x0 | x_r, c] at points x_r built from exact
mixture samples (a low-variance target: the teacher's conditional expectation, not eps - x0).
`fit_velocity` is the regression itself, for any source of points: rcmfn/toy/digits.py trains its learned
teacher with it on real digits (target eps - x0).
"""

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from tqdm.auto import tqdm

from rcmfn.precond import TIME_SCALE, VelocityNet
from rcmfn.time import TimeDistribution, UniformShift, sample_time
from rcmfn.toy import gmm

UNIFORM_TIME = UniformShift(shift=1.0)  # shift 1 is the identity: r ~ U[0, 1)


@dataclass(frozen=True)
class WarmStartConfig:
    """Hyperparameters of `fit_to_teacher`."""

    steps: int = 1500
    """optimiser steps"""
    batch_size: int = 64
    """samples per step"""
    lr: float = 4e-3
    """AdamW peak learning rate (linear warm-up, then cosine decay to lr_final_ratio * lr)"""
    lr_final_ratio: float = 0.05
    """final learning rate as a fraction of lr"""
    warmup_steps: int = 50
    """linear learning-rate warm-up steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    null_fraction: float = 0.1
    """fraction of each batch trained on the unconditional (null) embedding"""
    time_dist: TimeDistribution = UNIFORM_TIME
    """distribution of the RF time r of the regression points (shift 1 = uniform on [0, 1))"""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1; got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.null_fraction <= 1.0:
            raise ValueError(f"WarmStartConfig.null_fraction must lie in [0, 1]; got {self.null_fraction}")
        if self.lr <= 0 or not 0.0 <= self.lr_final_ratio <= 1.0:
            raise ValueError(f"need lr > 0 and lr_final_ratio in [0, 1]; got {self.lr}, {self.lr_final_ratio}")


def draw_labels(mixture: gmm.GaussianMixture, n: int, null_fraction: float, generator: torch.Generator):
    """n uniform class labels, each replaced by UNCOND with probability null_fraction."""
    labels = torch.randint(0, mixture.num_classes, (n,), generator=generator)
    null = torch.rand(n, generator=generator) < null_fraction
    return torch.where(null, torch.full_like(labels, gmm.UNCOND), labels)


def teacher_batch(
    mixture: gmm.GaussianMixture,
    labels: torch.Tensor,
    time_dist: TimeDistribution,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
):
    """(x_r, c_noise, cond, v*) for flow matching: x_r from exact x0, v* the exact teacher velocity.

    x_r, cond and v* are cast to `dtype` at the end; v* is computed in float64.
    """
    x0 = gmm.sample_mixture(mixture, labels, generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    r = sample_time(time_dist, labels.shape[0], generator=generator, domain="rf")
    rb = r.reshape(-1, 1, 1, 1, 1)
    x_r = (1.0 - rb) * x0 + rb * eps
    target = gmm.posterior_velocity(mixture, x_r, r, labels)
    cond = gmm.class_embeddings(mixture, labels)
    return x_r.to(dtype), (TIME_SCALE * r).to(dtype), cond.to(dtype), target.to(dtype)


def learning_rate(step: int, cfg: WarmStartConfig) -> float:
    """Linear warm-up over cfg.warmup_steps, then cosine decay from lr to lr_final_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1.0 + math.cos(progress * math.pi))
    return cfg.lr * (cfg.lr_final_ratio + (1.0 - cfg.lr_final_ratio) * cosine)


def fit_to_teacher(
    net: VelocityNet,
    params: TensorDict,
    mixture: gmm.GaussianMixture,
    generator: torch.Generator,
    cfg: WarmStartConfig = WarmStartConfig(),
    progress: bool = False,
) -> tuple[TensorDict, list[float]]:
    """Fit `net` to the mixture teacher's velocity; returns (fitted params, per-step losses).

    `fit_velocity` over `teacher_batch` points: labels, x0, eps and r all come from `generator`.
    """

    def batch_fn(gen: torch.Generator, dtype: torch.dtype):
        labels = draw_labels(mixture, cfg.batch_size, cfg.null_fraction, gen)
        return teacher_batch(mixture, labels, cfg.time_dist, gen, dtype)

    return fit_velocity(net, params, batch_fn, generator, cfg, progress, "warm start")


def fit_velocity(
    net: VelocityNet,
    params: TensorDict,
    batch_fn,
    generator: torch.Generator,
    cfg: WarmStartConfig = WarmStartConfig(),
    progress: bool = False,
    desc: str = "flow matching",
) -> tuple[TensorDict, list[float]]:
    """Regress `net` onto velocity targets; returns (fitted params, per-step losses).

    `batch_fn(generator, dtype) -> (x_r, c_noise, cond, target)` draws each step's regression points
    (cfg.batch_size of them) from `generator`. Loss per step: mean over the batch of the per-sample mean
    squared velocity error; AdamW with `learning_rate`'s schedule. params are copied, not modified; the
    data dtype follows the params. Eager on purpose: on 2 CPU cores compiling costs about what it saves
    (width 128 x depth 3, inductor: 102 -> 81 ms per step after 57 s of compiling; docs/toy.md "Default run").
    """
    fitted = params.clone().apply(lambda p: p.detach().requires_grad_(True))
    leaves = list(fitted.values())
    dtype = leaves[0].dtype
    # fused: one kernel for all ~100 tensors instead of a Python loop over them (CPU, width 128 x depth 3:
    # 7.0 -> 2.5 ms of a 104 ms step)
    optimizer = torch.optim.AdamW(leaves, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    losses = []
    for step in tqdm(range(cfg.steps), disable=not progress, desc=desc):
        x_r, c_noise, cond, target = batch_fn(generator, dtype)
        loss = (net(fitted, x_r, c_noise, cond) - target).square().mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return fitted.apply(lambda p: p.detach()), losses


@torch.no_grad()
def velocity_error(
    net: VelocityNet,
    params: TensorDict,
    mixture: gmm.GaussianMixture,
    generator: torch.Generator,
    n: int = 1024,
    time_dist: TimeDistribution = UNIFORM_TIME,
    null_fraction: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Held-out fit quality: velocity MSE per element and MSE / E|v*|^2 (relative), float64 sums.

    The net sees x_r, c_noise and cond in `dtype`.
    """
    labels = draw_labels(mixture, n, null_fraction, generator)
    x_r, c_noise, cond, target = teacher_batch(mixture, labels, time_dist, generator, dtype)
    err = (net(params, x_r, c_noise, cond).double() - target.double()).square().mean()
    return {"mse": err.item(), "relative_mse": (err / target.double().square().mean()).item()}
