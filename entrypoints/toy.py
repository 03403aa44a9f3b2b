"""The toy world: an analytic Gaussian-mixture teacher, tiny-DiT student / fake score, data and evaluation.

Used by `entrypoints.distill --model toy` and the study in docs/toy.md. The teacher is exact, so sample
quality is measured against the truth rather than a proxy.
"""

import math
import time
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from rcmfn.precond import trigflow_denoiser, x0_from_velocity
from rcmfn.rollout import BACKWARD_TIMESTEPS
from rcmfn.samplers import consistency_sample, consistency_times, teacher_euler_sample, teacher_rf_times
from rcmfn.toy import gmm
from rcmfn.toy.figure import save_toy_figure
from rcmfn.toy.metrics import toy_metrics
from rcmfn.toy.tiny_dit import TinyDiT, TinyDiTConfig, init_params, velocity_net
from rcmfn.toy.warm_start import WarmStartConfig, fit_to_teacher, velocity_error

BAND_SIGMAS = (80.0, 3.6, 2.6, 1.6, 1.0)  # sigma_max, then the band where the toy's modes are decided


@dataclass(frozen=True)
class ToyConfig:
    """The toy problem: mixture, student architecture, warm start and evaluation sizes."""

    mixture: gmm.MixtureConfig = field(default_factory=lambda: gmm.MixtureConfig(std_range=(0.6, 1.0)))
    """the analytic teacher (class-conditional Gaussian mixture)"""
    net: TinyDiTConfig = field(default_factory=lambda: TinyDiTConfig(width=128, depth=3, mlp_ratio=4, patch=4))
    """student and fake-score architecture (4 x 4 patches: 4 tokens per 8 x 8 latent; docs/toy.md "Default run")"""
    warm_start: WarmStartConfig = field(default_factory=lambda: WarmStartConfig(steps=4000))
    """flow-matching fit of the student / fake score to the teacher before distillation"""
    batch_size: int = 32
    """training batch (exact mixture samples, uniform classes)"""
    eval_samples: int = 2000
    """samples per sampler in the evaluation (spread evenly over the classes)"""


@dataclass
class ToyWorld:
    """Everything built from a ToyConfig."""

    cfg: ToyConfig
    mixture: gmm.GaussianMixture
    module: TinyDiT
    teacher: object
    student: object
    init_params: TensorDict
    warm_start_report: dict


def build_toy(cfg: ToyConfig, seed: int, progress: bool = True) -> ToyWorld:
    """Build the mixture, the tiny DiT, and warm-start it on the teacher (the shared initialisation)."""
    mixture = gmm.build_mixture(cfg.mixture)
    module = TinyDiT(cfg.net)
    if cfg.mixture.text_dim != cfg.net.text_dim or cfg.mixture.channels != cfg.net.channels:
        raise ValueError(
            f"toy mixture and net disagree: text_dim {cfg.mixture.text_dim} vs {cfg.net.text_dim}, "
            f"channels {cfg.mixture.channels} vs {cfg.net.channels}"
        )
    net = velocity_net(module)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    params, losses = fit_to_teacher(net, init_params(module, gen), mixture, gen, cfg.warm_start, progress)
    report = {"warm_start_seconds": time.perf_counter() - start, "warm_start_final_loss": losses[-1]}
    report |= {f"warm_start_{k}": v for k, v in velocity_error(net, params, mixture, gen).items()}
    teacher = trigflow_denoiser(gmm.velocity, time_dtype=torch.float64)
    student = trigflow_denoiser(net, net_dtype=torch.float32)
    return ToyWorld(cfg, mixture, module, teacher, student, params, report)


def toy_batch_fn(world: ToyWorld):
    """batch_fn(generator) -> (x0, cond, uncond): exact samples of uniform classes, null uncondition."""

    def batch_fn(gen: torch.Generator):
        n = world.cfg.batch_size
        labels = torch.randint(0, world.mixture.num_classes, (n,), generator=gen)
        x0 = gmm.sample_mixture(world.mixture, labels, gen).float()
        cond = gmm.class_embeddings(world.mixture, labels).float()
        uncond = gmm.class_embeddings(world.mixture, torch.full_like(labels, gmm.UNCOND)).float()
        return x0, cond, uncond

    return batch_fn


def eval_labels(world: ToyWorld) -> torch.Tensor:
    n, classes = world.cfg.eval_samples, world.mixture.num_classes
    return torch.arange(n) % classes


def sample_student(
    world: ToyWorld,
    params,
    steps: int,
    seed: int,
    sigma_max: float = 80.0,
    mid_times: tuple[float, ...] = BACKWARD_TIMESTEPS,
) -> torch.Tensor:
    """Few-step consistency samples of the student for the evaluation labels."""
    labels = eval_labels(world)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(steps, labels.shape[0], *world.mixture.shape, generator=gen)
    cond = gmm.class_embeddings(world.mixture, labels).float()
    return consistency_sample(world.student, params, noise, consistency_times(steps, sigma_max, mid_times), cond)


def sample_teacher(
    world: ToyWorld, steps: int, guidance: float, seed: int, shift: float = 1.0, sigma_max: float = 80.0
) -> torch.Tensor:
    """Teacher Euler samples (rectified-flow time, CFG) for the evaluation labels."""
    return _euler(world, world.teacher, world.mixture, steps, guidance, seed, shift, sigma_max)


def sample_warm_start(world: ToyWorld, steps: int, guidance: float, seed: int, sigma_max: float = 80.0):
    """The capacity control: the warm-started net (the student's start) sampled like the teacher."""
    return _euler(world, world.student, world.init_params, steps, guidance, seed, 1.0, sigma_max)


def _euler(world: ToyWorld, denoise, params, steps, guidance, seed, shift, sigma_max) -> torch.Tensor:
    labels = eval_labels(world)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(labels.shape[0], *world.mixture.shape, generator=gen, dtype=torch.float64)
    cond = gmm.class_embeddings(world.mixture, labels)
    uncond = gmm.class_embeddings(world.mixture, torch.full_like(labels, gmm.UNCOND))
    rf = teacher_rf_times(steps, shift, sigma_max)
    return teacher_euler_sample(denoise, params, noise, rf, cond, uncond, guidance)


def student_map(world: ToyWorld, params):
    """The student's one-step map (x_t, t, cond) -> x0 = cos t x_t - sin t F_theta: its 1-step sampler from t."""
    one_step = lambda x_t, t, c: x0_from_velocity(x_t.double(), t, world.student(params, x_t, t, c).double())  # noqa: E731
    return torch.no_grad()(one_step)


def band_samples(world: ToyWorld, one_step, sigma: float, seed: int) -> torch.Tensor:
    """one_step(x_t, t, cond) -> x0 on the exact teacher marginal at sigma, for the evaluation labels.

    x_t = cos t x0 + sin t eps, t = atan sigma, x0 exact: the (unguided) exact teacher's PF-ODE marginal.
    A map that solves the ODE from t lands every sample on a mode (a test checks it), so the off-mode
    share of its output is the quality lost when the few-step sampler leaves from sigma.
    """
    labels = eval_labels(world)
    gen = torch.Generator().manual_seed(seed + 104729)
    x0 = gmm.sample_mixture(world.mixture, labels, gen)
    t = torch.full((labels.shape[0],), math.atan(sigma), dtype=torch.float64)
    x_t = math.cos(t[0]) * x0 + math.sin(t[0]) * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    return one_step(x_t.float(), t, gmm.class_embeddings(world.mixture, labels).float())


def exact_samples(world: ToyWorld, seed: int) -> torch.Tensor:
    """Samples of the true class-conditional mixture for the evaluation labels."""
    return gmm.sample_mixture(world.mixture, eval_labels(world), torch.Generator().manual_seed(seed))


def evaluate(world: ToyWorld, samples: torch.Tensor, seed: int) -> dict:
    """Mode coverage, mode-weight TV, within-mode spread ratio, sliced W2 (vs fresh exact samples)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    return toy_metrics(world.mixture, samples.double(), eval_labels(world), gen).as_dict()


def sampler_table(
    world: ToyWorld,
    student_params,
    seed: int,
    guidance: float,
    sigma_max: float,
    mid_times: tuple[float, ...] = BACKWARD_TIMESTEPS,
    band_sigmas: tuple[float, ...] = BAND_SIGMAS,
    teacher_steps=(4, 8, 50),
    student_steps=(1, 2, 4),
) -> tuple[dict, dict]:
    """{row name: samples} and {row name: seconds}, in table order: exact data, teacher Euler, the
    warm-started net as a 50-step Euler sampler with CFG (the ceiling the student's capacity sets), the
    few-step student, and the student's one-step map from the exact marginal at each of `band_sigmas`
    (the noise band where quality is lost)."""
    rows, seconds = {}, {}

    def timed(name, fn):
        start = time.perf_counter()
        rows[name] = fn()
        seconds[name] = time.perf_counter() - start

    timed("exact data", lambda: exact_samples(world, seed))
    for steps in teacher_steps:
        timed(
            f"teacher Euler {steps} (cfg {guidance:g})",
            lambda s=steps: sample_teacher(world, s, guidance, seed, sigma_max=sigma_max),
        )
    timed(f"warm start Euler 50 (cfg {guidance:g})", lambda: sample_warm_start(world, 50, guidance, seed, sigma_max))
    for steps in student_steps:
        timed(
            f"student {steps}-step",
            lambda s=steps: sample_student(world, student_params, s, seed, sigma_max, mid_times),
        )
    one_step = student_map(world, student_params)
    for sigma in band_sigmas:
        timed(f"student map from sigma {sigma:g}", lambda s=sigma: band_samples(world, one_step, s, seed))
    return rows, seconds


def final_report(
    world: ToyWorld,
    student_params,
    seed: int,
    guidance: float,
    sigma_max: float,
    mid_times: tuple[float, ...] = BACKWARD_TIMESTEPS,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """({"rows": metrics per sampler_table row} for metrics.json and the table, {figure column: samples})."""
    samples, seconds = sampler_table(world, student_params, seed, guidance, sigma_max, mid_times)
    rows = {name: evaluate(world, x, seed) | {"seconds": seconds[name]} for name, x in samples.items()}
    pick = lambda prefix: next(x for name, x in samples.items() if name.startswith(prefix))  # noqa: E731
    figure = {"exact": samples["exact data"], "teacher 50": pick("teacher Euler 50 "), "warm start 50": pick("warm")}
    figure |= {f"student {k}": samples[f"student {k}-step"] for k in (1, 2, 4)}
    return {"rows": rows}, figure


def save_figure(
    world: ToyWorld, student_params, seed: int, path, guidance: float, mid_times=BACKWARD_TIMESTEPS
) -> None:
    """Truth, 50-step teacher and 1/2/4-step student on the modes' principal plane, plus mode shares."""
    sets = {
        "exact": exact_samples(world, seed),
        "teacher 50": sample_teacher(world, 50, guidance, seed),
        **{f"student {s}": sample_student(world, student_params, s, seed, mid_times=mid_times) for s in (1, 2, 4)},
    }
    save_sets_figure(world, sets, path)


def save_sets_figure(world: ToyWorld, sets: dict[str, torch.Tensor], path) -> None:
    """The figure of `sets` {column: samples of the evaluation labels} (final_report's second value)."""
    save_toy_figure(path, sets, world.mixture, eval_labels(world))


def format_table(rows: dict) -> str:
    """Plain-text table of sampler rows x metrics."""
    columns = ["coverage", "weight_tv", "spread", "off_mode", "sliced_w2", "class_match", "seconds"]
    width = max(len(name) for name in rows) + 2
    lines = ["sampler".ljust(width) + "".join(c.rjust(12) for c in columns)]
    for name, metrics in rows.items():
        lines.append(name.ljust(width) + "".join(f"{metrics[c]:12.4f}" for c in columns))
    return "\n".join(lines)
