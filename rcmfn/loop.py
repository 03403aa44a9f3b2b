"""One rCM training iteration: the alternating student / critic update, composed from rcmfn transforms.

SPEC-rcm Algorithm (§2-§4, §7). The loop state is explicit (`TrainState`); every random draw comes from
a generator seeded by (seed, iteration), so a resumed run continues bit for bit. The networks are
passed as denoisers (`denoise(params, x_t, t, cond) -> F`); student and fake score share one.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from rcmfn.divergence import GradientHealth, count_bad_step, gradient_health, health_metrics
from rcmfn.ema import ema_beta, ema_exponent, ema_update
from rcmfn.lora import optimizer_groups
from rcmfn.losses import tangent_warmup_ratio
from rcmfn.precond import Denoiser
from rcmfn.schedule import (
    Schedule,
    critic_iteration,
    effective_student_iteration,
    is_student_phase,
    lr_warmup_factor,
    rollout_steps,
)
from rcmfn.step import (
    LossConfig,
    critic_loss,
    dcm_student_loss,
    dmd_student_loss,
    draw_rollout,
    noise_like,
    scm_student_loss,
    step_generator,
    uniform_dcm_draw,
)
from rcmfn.time import sample_time


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings per network and the EMA (SPEC-rcm §4.3, §7; defaults: the Wan 1.3B run)."""

    student_lr: float = 2e-6
    fake_lr: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    lr_warmup_steps: int = 100
    ema_rate: float = 0.1

    def __post_init__(self):
        finite = lambda v: v == v and abs(v) != float("inf")  # noqa: E731
        for name in ("student_lr", "fake_lr", "weight_decay"):
            if not (finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be finite and >= 0; got {getattr(self, name)}")
        if not all(finite(b) and 0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"betas must be two values in [0, 1); got {self.betas}")
        if not (finite(self.eps) and self.eps > 0) or self.lr_warmup_steps < 0:
            raise ValueError(f"need eps > 0 and lr_warmup_steps >= 0; got {self.eps}, {self.lr_warmup_steps}")
        ema_exponent(self.ema_rate)  # names a rate outside (0, 0.2887) now, not at the first student step


@dataclass(frozen=True)
class LoopConfig:
    """Everything one iteration needs besides networks and data."""

    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tangent_warmup: int = 0
    student_update_freq: int = 5
    seed: int = 0
    max_bad_steps: int = 3
    """Stop (DivergenceError) after this many consecutive skipped or fully masked steps of one network."""

    def __post_init__(self):
        if self.loss.method == "dmd" and self.tangent_warmup != 0:
            raise ValueError(f"method 'dmd' needs tangent_warmup = 0; got {self.tangent_warmup}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1; got {self.max_bad_steps}")

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.tangent_warmup, self.student_update_freq, self.loss.uses_critic)


@dataclass(frozen=True)
class Networks:
    """The three networks as denoisers; the teacher's parameters are frozen and live here."""

    student: Denoiser
    teacher: Denoiser
    teacher_params: TensorDict
    fake: Denoiser | None = None
    student_tangent: Callable | None = None  # (params, x_t, t, cond, F_T) -> (F, T); default scm_tangent


@dataclass
class TrainState:
    """What the loop carries between iterations (all of it is checkpointed)."""

    iteration: int
    student: TensorDict
    ema: TensorDict
    student_opt: torch.optim.Optimizer
    fake: TensorDict | None = None
    fake_opt: torch.optim.Optimizer | None = None
    student_steps: int = 0
    critic_steps: int = 0
    bad_steps: dict[str, int] = field(default_factory=dict)
    """Consecutive skipped or fully masked steps per network (not checkpointed: a resume starts at 0)."""


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # x0, cond, uncond
BatchFn = Callable[[torch.Generator], Batch]


def adamw(params: TensorDict, lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    """One network's AdamW, plain or FSDP2 tensors; groups: rcmfn/lora.py. Fused: one op, not a dozen per
    tensor on the CPU or a dozen DTensor shards on first call (docs/benchmarks.md "First-call cost")."""
    groups = optimizer_groups(dict(params.items(include_nested=True, leaves_only=True)))
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=True)


def init_state(student: TensorDict, fake: TensorDict | None, cfg: LoopConfig) -> TrainState:
    """Fresh state: trainable copies of the given weights, an fp32 EMA, one AdamW per network."""
    student = student.apply(lambda p: p.detach().clone().requires_grad_(True))
    fake = None if fake is None else fake.apply(lambda p: p.detach().clone().requires_grad_(True))
    return TrainState(
        iteration=0,
        student=student,
        ema=student.apply(lambda p: p.detach().float().clone()),
        student_opt=adamw(student, cfg.optim.student_lr, cfg.optim),
        fake=fake,
        fake_opt=None if fake is None else adamw(fake, cfg.optim.fake_lr, cfg.optim),
    )


def _optimizer_step(opt: torch.optim.Optimizer, base_lr: float, step: int, cfg: OptimConfig) -> GradientHealth:
    """Step `opt` if its raw gradients are finite; skip the step otherwise (weights, optimiser state and
    warm-up unchanged). Where the official trainer zeroes non-finite entries and steps anyway (SPEC-rcm
    §4.3 force_finite), a non-finite gradient here is a skipped step that rcmfn.divergence counts."""
    health = gradient_health(p.grad for group in opt.param_groups for p in group["params"])
    if health.finite:
        for group in opt.param_groups:
            group["lr"] = base_lr * lr_warmup_factor(step, cfg.lr_warmup_steps) * group.get("lr_scale", 1.0)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return health


def _student_update(state: TrainState, nets: Networks, batch: Batch, gen, cfg: LoopConfig, i: int) -> dict:
    x0, cond, uncond = batch
    loss_cfg = cfg.loss
    i_eff = effective_student_iteration(i, cfg.schedule)
    metrics = {}
    if loss_cfg.consistency == "scm":
        t = sample_time(loss_cfg.p_G, x0.shape[0], gen, "trig", x0.device)
        noise = noise_like(x0.shape, gen, x0.device)
        rho = tangent_warmup_ratio(i, cfg.tangent_warmup)
        loss, aux = scm_student_loss(
            nets.student,
            state.student,
            nets.teacher,
            nets.teacher_params,
            x0,
            cond,
            uncond,
            t,
            noise,
            loss_cfg,
            rho,
            nets.student_tangent,
        )
        loss.sum().backward()
        metrics |= {"scm_loss": loss.mean().item(), **{k: v.item() for k, v in aux.items()}}
    elif loss_cfg.consistency == "dcm":
        u = uniform_dcm_draw(x0.shape[0], loss_cfg, gen, x0.device)
        noise = noise_like(x0.shape, gen, x0.device)
        loss, aux = dcm_student_loss(
            nets.student, state.student, nets.teacher, nets.teacher_params, x0, cond, uncond, u, noise, loss_cfg
        )
        loss.sum().backward()
        metrics |= {"dcm_loss": loss.mean().item(), **{k: v.item() for k, v in aux.items()}}
    if loss_cfg.uses_critic and i >= cfg.tangent_warmup:
        steps = rollout_steps(i_eff, loss_cfg.max_rollout_steps)
        draws = draw_rollout(steps, x0.shape, loss_cfg, gen, x0.device, x0)
        loss, aux = dmd_student_loss(
            nets.student,
            state.student,
            nets.teacher,
            nets.teacher_params,
            nets.fake,
            state.fake,
            cond,
            uncond,
            *draws,
            loss_cfg,
        )
        loss.sum().backward()
        metrics |= {"dmd_loss": loss.mean().item(), **{k: v.item() for k, v in aux.items()}}
    health = _optimizer_step(state.student_opt, cfg.optim.student_lr, state.student_steps, cfg.optim)
    if health.finite:  # a skipped step leaves the EMA and the step count (warm-up) where they were
        ema_update(state.ema, state.student, ema_beta(i_eff, cfg.optim.ema_rate))
        state.student_steps += 1
    metrics |= health_metrics(health)
    count_bad_step(state.bad_steps, "student", metrics, x0.shape[0], state.iteration, cfg.max_bad_steps)
    return metrics


def _critic_update(state: TrainState, nets: Networks, batch: Batch, gen, cfg: LoopConfig, i: int) -> dict:
    x0, cond, _ = batch
    steps = rollout_steps(critic_iteration(i, cfg.schedule), cfg.loss.max_rollout_steps)
    draws = draw_rollout(steps, x0.shape, cfg.loss, gen, x0.device, x0)
    loss, aux = critic_loss(nets.student, state.student, nets.fake, state.fake, cond, *draws)
    loss.sum().backward()
    health = _optimizer_step(state.fake_opt, cfg.optim.fake_lr, state.critic_steps, cfg.optim)
    state.critic_steps += int(health.finite)
    metrics = {"fake_score_loss": loss.mean().item(), **{k: v.item() for k, v in aux.items()}}
    metrics |= health_metrics(health)
    count_bad_step(state.bad_steps, "fake score", metrics, x0.shape[0], state.iteration, cfg.max_bad_steps)
    return metrics


def train_iteration(
    state: TrainState, nets: Networks, batch_fn: BatchFn, cfg: LoopConfig, stage_start: int = 0
) -> dict:
    """Run iteration `state.iteration` (student or critic phase), advance the state, return metrics.

    `stage_start`: the iteration its stage began at (rcmfn/stages.py). The schedules (phases, tangent
    warm-up, rollout cycle, EMA) count from it; the random draws from the run's start, so stages never
    repeat each other's draws.
    """
    if cfg.loss.uses_critic and (state.fake is None or nets.fake is None):
        raise ValueError(f"method {cfg.loss.method!r} needs a fake-score network and its parameters")
    if not 0 <= stage_start <= state.iteration:
        raise ValueError(f"stage_start must lie in [0, iteration {state.iteration}]; got {stage_start}")
    gen = step_generator(cfg.seed, state.iteration)
    batch = batch_fn(gen)
    i = state.iteration - stage_start
    student_phase = is_student_phase(i, cfg.schedule)
    update = _student_update if student_phase else _critic_update
    metrics = {"iteration": state.iteration, "phase": "student" if student_phase else "critic"}
    metrics |= update(state, nets, batch, gen, cfg, i)
    state.iteration += 1
    return metrics
