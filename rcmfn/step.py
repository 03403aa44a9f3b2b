"""Student and critic losses of one rCM iteration, composed from the core transforms.

SPEC-rcm §2 (sCM), §3 (DMD), §4.1 (fake score), §5 (dCM). Each function takes the networks as
denoisers with their parameters, the batch, and every random draw (made by `draw_*` from a per-step
generator, so that ranks and resumed runs agree without broadcasts) and returns a [B] float64 loss
plus detached diagnostics. The loop sums, backpropagates and steps the optimisers.
"""

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from rcmfn.losses import dcm_loss, dmd_loss, fake_score_loss, nonfinite_samples, scm_loss
from rcmfn.precond import Denoiser, batch_view, check_guidance, guided_velocity, x0_from_velocity
from rcmfn.rollout import BACKWARD_TIMESTEPS, consistency_rollout, rollout_times
from rcmfn.tangent import TangentMethod, scm_tangent
from rcmfn.time import LogNormal, TimeDistribution, Truncated, UniformShift, rf_to_trig, sample_time, shift_rf_time

# "dcm+dmd" is the official cm_type = "dcm" with a fake score: the dCM term stands where sCM's would and the
# DMD term is added exactly as in rcm (NVlabs/rcm t2v_model_distill_rcm.py:702-722, 5b41aa9; SPEC-rcm §5).
Method = Literal["rcm", "scm", "dmd", "dcm", "dcm+dmd"]
METHODS: tuple[str, ...] = get_args(Method)


@dataclass(frozen=True)
class LossConfig:
    """Hyperparameters of the losses (defaults: SPEC-rcm §10.1 class defaults)."""

    method: Method = "rcm"
    guidance: float = 5.0
    loss_scale: float = 100.0
    loss_scale_dmd: float = 1.0
    dmd_reference_elements: int | None = None  # lambda scaled by sqrt(N_ref / N) (losses.dmd_size_factor)
    p_G: TimeDistribution | Truncated = field(default_factory=lambda: LogNormal(-0.8, 1.6))
    p_D: TimeDistribution | Truncated = field(default_factory=lambda: LogNormal(0.0, 1.6))
    tangent_method: TangentMethod = "jvp"
    fd_step: float = 1e-4
    max_rollout_steps: int = 4
    dmd_fix_timesteps: bool = False
    backward_timesteps: tuple[float, ...] = BACKWARD_TIMESTEPS
    dcm_total_steps: int = 48
    dcm_skip_steps: int = 1
    dcm_shift: float = 5.0
    rollout_start: float | None = None
    """TrigFlow time the DMD / critic rollouts start at, from the data renoised to it (the true marginal)
    instead of from pure noise at pi/2: the low-noise expert of a two-expert model trained over its own
    range starts where the high-noise expert hands over (rcmfn/switch.py, docs/toy.md "Two experts")."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        check_guidance(self.guidance)
        if self.max_rollout_steps < 1:
            raise ValueError(f"max_rollout_steps must be >= 1; got {self.max_rollout_steps}")
        if self.rollout_start is not None and not 0.0 < self.rollout_start <= math.pi / 2:
            raise ValueError(f"rollout_start must lie in (0, pi/2]; got {self.rollout_start}")
        if self.dmd_reference_elements is not None and self.dmd_reference_elements < 0:
            raise ValueError(f"dmd_reference_elements must be >= 0 (0 = off); got {self.dmd_reference_elements}")

    @property
    def consistency(self) -> Literal["scm", "dcm"] | None:
        """The consistency term of the student step: sCM (§2), dCM (§5) or none (pure DMD)."""
        return {"rcm": "scm", "scm": "scm", "dcm": "dcm", "dcm+dmd": "dcm"}.get(self.method)

    @property
    def uses_critic(self) -> bool:
        return self.method in ("rcm", "dmd", "dcm+dmd") and self.loss_scale_dmd > 0


def step_generator(seed: int, step: int, stream: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, stream): every rank and every resumed run draws the same."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 16 + stream)


def noise_like(shape, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Unit Gaussian noise (float32 draw, as the official code) from an explicit generator, drawn on the
    generator's device and moved to `device` (the same numbers on every device for a CPU generator)."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device, dtype)


def scm_student_loss(
    student: Denoiser,
    student_params,
    teacher: Denoiser,
    teacher_params,
    x0: torch.Tensor,
    cond,
    uncond,
    t: torch.Tensor,
    noise: torch.Tensor,
    cfg: LossConfig,
    warmup_ratio: float = 1.0,
    tangent_fn=None,
) -> tuple[torch.Tensor, dict]:
    """sCM loss of SPEC-rcm §2: teacher target, detached student tangent, one student pass with grad.

    `tangent_fn(params, x_t, t, cond, F_teacher) -> (F, T)` replaces `scm_tangent` over `student`, e.g.
    by a `torch.compile`d one (torch.func.jvp cannot run over a compiled function; compile around it).
    """
    tb = batch_view(t, x0)
    x_t = torch.cos(tb) * x0.double() + torch.sin(tb) * noise.double()
    with torch.no_grad():
        F_teacher = guided_velocity(teacher, teacher_params, x_t, t, cond, uncond, cfg.guidance).detach()
    if tangent_fn is None:
        _, tangent = scm_tangent(student, student_params, x_t, t, cond, F_teacher, cfg.tangent_method, cfg.fd_step)
    else:
        _, tangent = tangent_fn(student_params, x_t, t, cond, F_teacher)
    F_student = student(student_params, x_t, t, cond)
    loss = scm_loss(F_student, F_teacher, tangent, x_t, t, warmup_ratio, cfg.loss_scale)
    return loss, {
        "tangent_norm": tangent.detach().flatten(1).norm(dim=1).mean(),
        "scm_masked": nonfinite_samples(F_student, F_teacher, tangent).sum(),  # the samples scm_loss zeroes
    }


def draw_rollout(
    num_steps: int, shape, cfg: LossConfig, generator: torch.Generator, device, x0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise [N, B, ...], times [N + 1, B], D-time t_D [B] and its noise, for one DMD / critic step.

    With `cfg.rollout_start` the rollout starts at that time from `x0` renoised with noise[0] (same draws,
    so the default path is unchanged): noise[0] becomes the start state cos t_s x0 + sin t_s noise[0].
    """
    noise = noise_like((num_steps, *shape), generator, device)
    fixed = cfg.backward_timesteps if cfg.dmd_fix_timesteps else None
    start = math.pi / 2 if cfg.rollout_start is None else cfg.rollout_start
    times = rollout_times(num_steps, shape[0], cfg.p_D, generator, fixed, device, start)
    t_D = sample_time(cfg.p_D, shape[0], generator, "trig", device)
    if cfg.rollout_start is not None:
        if x0 is None:
            raise ValueError("LossConfig.rollout_start needs the batch's x0 to start the rollout from")
        noise = torch.cat([_renoise(x0, times[0], noise[0]).to(noise.dtype)[None], noise[1:]])
    return noise, times, t_D, noise_like(shape, generator, device)


def _renoise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    tb = batch_view(t, x0)
    return torch.cos(tb) * x0.double() + torch.sin(tb) * noise.double()


def dmd_student_loss(
    student: Denoiser,
    student_params,
    teacher: Denoiser,
    teacher_params,
    fake: Denoiser,
    fake_params,
    cond,
    uncond,
    rollout_noise,
    times,
    t_D,
    noise_D,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict]:
    """DMD loss of SPEC-rcm §3: rollout (grad through last step), then fake vs guided-teacher x0."""
    generated = consistency_rollout(student, student_params, rollout_noise, times, cond)
    x_D = _renoise(generated, t_D, noise_D)
    with torch.no_grad():
        fake_x0 = x0_from_velocity(x_D, t_D, fake(fake_params, x_D, t_D, cond).double())
        F_real = guided_velocity(teacher, teacher_params, x_D, t_D, cond, uncond, cfg.guidance)
        real_x0 = x0_from_velocity(x_D, t_D, F_real.double())
    masked = nonfinite_samples(generated, fake_x0, real_x0).sum()  # the samples dmd_loss zeroes
    loss = dmd_loss(generated, fake_x0, real_x0, cfg.loss_scale_dmd, cfg.dmd_reference_elements)
    return loss, {"dmd_masked": masked}


def critic_loss(
    student: Denoiser,
    student_params,
    fake: Denoiser,
    fake_params,
    cond,
    rollout_noise,
    times,
    t_D,
    noise_D,
) -> tuple[torch.Tensor, dict]:
    """Fake-score loss of SPEC-rcm §4.1: a gradient-free rollout, then x0 flow matching at t_D."""
    with torch.no_grad():
        generated = consistency_rollout(student, student_params, rollout_noise, times, cond).detach()
    x_D = _renoise(generated, t_D, noise_D)
    fake_x0 = x0_from_velocity(x_D, t_D, fake(fake_params, x_D, t_D, cond).double())
    masked = nonfinite_samples(generated, fake_x0).sum()  # the samples fake_score_loss zeroes
    return fake_score_loss(generated, fake_x0, t_D), {"fake_score_masked": masked}


def dcm_times(u: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """[K + 1, B] trig times t_0 > ... > t_K from u ~ U[0, 1 - K Delta). SPEC-rcm §5.1."""
    delta = 1.0 / cfg.dcm_total_steps
    steps = torch.arange(cfg.dcm_skip_steps + 1, dtype=torch.float64, device=u.device)[:, None]
    return rf_to_trig(shift_rf_time(1.0 - (u.double()[None] + steps * delta), cfg.dcm_shift))


def dcm_student_loss(
    student: Denoiser,
    student_params,
    teacher: Denoiser,
    teacher_params,
    x0: torch.Tensor,
    cond,
    uncond,
    u: torch.Tensor,
    noise: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict]:
    """Discrete-time CM of SPEC-rcm §5: prediction at t_0 vs the student at t_K after K teacher
    Euler steps in trig time (current weights as target, no EMA)."""
    times = dcm_times(u, cfg)
    x = _renoise(x0, times[0], noise)
    prediction = x0_from_velocity(x, times[0], student(student_params, x, times[0], cond).double())
    with torch.no_grad():
        for k in range(cfg.dcm_skip_steps):
            F_T = guided_velocity(teacher, teacher_params, x, times[k], cond, uncond, cfg.guidance).double()
            x = x - batch_view(times[k] - times[k + 1], x) * F_T
        target = x0_from_velocity(x, times[-1], student(student_params, x, times[-1], cond).double())
    masked = nonfinite_samples(prediction, target).sum()  # the samples dcm_loss zeroes
    return dcm_loss(prediction, target, cfg.loss_scale), {"dcm_masked": masked}


def uniform_dcm_draw(batch: int, cfg: LossConfig, generator: torch.Generator, device) -> torch.Tensor:
    """u ~ U[0, 1 - K Delta) (float32 draw cast to float64). SPEC-rcm §5.1."""
    span = 1.0 - cfg.dcm_skip_steps / cfg.dcm_total_steps
    u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float32)
    return u.double().to(device) * span


__all__ = [
    "LossConfig",
    "METHODS",
    "LogNormal",
    "UniformShift",
    "step_generator",
    "noise_like",
    "scm_student_loss",
    "draw_rollout",
    "dmd_student_loss",
    "critic_loss",
    "dcm_times",
    "dcm_student_loss",
    "uniform_dcm_draw",
]
