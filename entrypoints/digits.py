"""The digits world: real 8x8 digits, a learned flow-matching teacher, its distillation and evaluation.

Used by `python -m entrypoints.digits_study` (docs/digits.md). Unlike the Gaussian-mixture toy the
teacher is learned and imperfect: a tiny DiT trained by flow matching on the training digits, then
frozen and used through the same denoiser interface. Student and fake score start from its weights (as
rCM starts from the teacher's) and distil with `rcmfn.loop.train_iteration`, the toy's loop, the real
training digits as x0 and the class embeddings as conditions. Samples are judged against the held-out
digits (rcmfn/toy/digits.py `digit_metrics`).
"""

import time
from dataclasses import dataclass, field, replace

import torch
from tensordict import TensorDict
from tqdm.auto import tqdm

from entrypoints.config import DistillConfig, loop_config
from entrypoints.presets import TOY_STUDIES_EMA_RATE, TOY_STUDIES_MID_TIMES, get_preset
from rcmfn.loop import Networks, init_state, train_iteration
from rcmfn.precond import Denoiser, trigflow_denoiser
from rcmfn.samplers import consistency_sample, consistency_times, teacher_euler_sample, teacher_rf_times
from rcmfn.toy import digits
from rcmfn.toy.feature_metrics import frechet_distance, precision_recall
from rcmfn.toy.tiny_dit import TinyDiT, TinyDiTConfig, init_params, velocity_net
from rcmfn.toy.warm_start import WarmStartConfig


@dataclass(frozen=True)
class DigitsConfig:
    """The digits problem: data split, teacher, evaluator, distillation and the samplers compared.
    Distillation settings left unset take the toy preset's values (entrypoints/presets.py)."""

    held_out_fraction: float = 0.3
    """share of each class held out as the evaluation's real reference (never seen in training)"""
    split_seed: int = 0
    """seed of the train / held-out split (fixed across study seeds)"""
    net: TinyDiTConfig = field(default_factory=lambda: TinyDiTConfig(channels=1, width=64, depth=2, mlp_ratio=2))
    """teacher, student and fake-score architecture (one 8x8 channel: 4 x 4 tokens of 2 x 2 pixels)"""
    teacher: WarmStartConfig = field(
        default_factory=lambda: WarmStartConfig(steps=1500, batch_size=128, lr=3e-3, warmup_steps=100)
    )
    """flow-matching training of the teacher on the training digits (target eps - x0)"""
    classifier: digits.ClassifierConfig = field(default_factory=digits.ClassifierConfig)
    """the evaluator trained on the real training digits"""
    iterations: int = 2000
    """distillation iterations per run (student + critic)"""
    batch_size: int = 64
    """distillation batch (training digits drawn with replacement, their labels as conditions)"""
    guidance: float = 1.5
    """CFG weight w of the teacher, in distillation and in its own Euler sampler"""
    dmd_weight: float | None = None
    """rCM's lambda in the toy preset's units (N_ref = Wan 480p); toy preset's if unset"""
    student_lr: float | None = None
    """student AdamW learning rate; toy preset's if unset"""
    fake_lr: float | None = None
    """fake-score AdamW learning rate; toy preset's if unset"""
    tangent_warmup: int | None = None
    """sCM tangent warm-up iterations H (the sCM-only prefix of rcm); toy preset's if unset"""
    teacher_steps: tuple[int, ...] = (4, 8, 50)
    """Euler step counts of the teacher rows"""
    student_steps: tuple[int, ...] = (1, 2, 4)
    """step counts of the student rows"""

    def __post_init__(self):
        if self.net.channels != 1:
            raise ValueError(f"DigitsConfig.net.channels must be 1 (grey 8x8 digits); got {self.net.channels}")
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError(f"iterations and batch_size must be >= 1; got {self.iterations}, {self.batch_size}")
        if min(self.teacher_steps + self.student_steps, default=0) < 1:
            raise ValueError(f"step counts must be >= 1; got {self.teacher_steps}, {self.student_steps}")


@dataclass
class DigitsWorld:
    """What every run of one seed shares: the data, the table of class embeddings, the nets, the judge."""

    cfg: DigitsConfig
    split: digits.DigitsSplit
    table: torch.Tensor
    module: TinyDiT
    denoiser: Denoiser
    classifier: digits.DigitClassifier


def build_world(cfg: DigitsConfig) -> DigitsWorld:
    """Load and split the digits, draw the embedding table, train the classifier (all seed-independent)."""
    split = digits.load_digits_split(cfg.held_out_fraction, cfg.split_seed)
    table = digits.class_table(dim=cfg.net.text_dim)
    module = TinyDiT(cfg.net)
    denoiser = trigflow_denoiser(velocity_net(module), net_dtype=torch.float32)
    classifier = digits.train_classifier(split.train_x, split.train_y, cfg.classifier)
    return DigitsWorld(cfg, split, table, module, denoiser, classifier)


def train_teacher(world: DigitsWorld, seed: int, progress: bool) -> tuple[TensorDict, dict]:
    """The learned teacher of `seed`: fresh init, flow matching; returns (frozen params, report)."""
    gen = torch.Generator().manual_seed(seed)
    net = velocity_net(world.module)
    start = time.perf_counter()
    params, losses = digits.train_teacher(
        net, init_params(world.module, gen), world.split, world.table, gen, world.cfg.teacher, progress
    )
    seconds = time.perf_counter() - start
    fresh = torch.Generator().manual_seed(seed + 7919)
    fresh_loss = digits.flow_matching_loss(net, params, world.split, world.table, fresh, world.cfg.teacher)
    report = {
        "teacher_seconds": seconds,
        "teacher_final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "teacher_fresh_loss": fresh_loss,
    }
    return params.apply(lambda p: p.detach().requires_grad_(False)), report


def loop_settings(cfg: DigitsConfig, method: str, seed: int, dmd_weight: float | None = None):
    """The toy preset merged with the digits overrides (entrypoints.config.loop_config); `dmd_weight`
    overrides cfg.dmd_weight."""
    return loop_config(
        DistillConfig(
            model="toy",
            method=method,
            seed=seed,
            iterations=cfg.iterations,
            guidance=cfg.guidance,
            dmd_weight=cfg.dmd_weight if dmd_weight is None else dmd_weight,
            student_lr=cfg.student_lr,
            fake_lr=cfg.fake_lr,
            tangent_warmup=None if method == "dmd" else cfg.tangent_warmup,
            # the official rollouts, with which docs/digits.md was measured (the mixture toy's preset steps
            # its rollouts through its mid times since; not tried on the digits)
            rollout_times="drawn",
            max_rollout_steps=4,
            ema_rate=TOY_STUDIES_EMA_RATE,  # the EMA length docs/digits.md was measured with
        )
    )


def batch_fn(world: DigitsWorld):
    """batch_fn(generator) -> (x0, cond, uncond): training digits with replacement, null uncondition."""

    def draw(gen: torch.Generator):
        idx = torch.randint(0, world.split.train_y.shape[0], (world.cfg.batch_size,), generator=gen)
        labels = world.split.train_y[idx]
        cond = digits.class_embeddings(world.table, labels).float()
        uncond = digits.class_embeddings(world.table, torch.full_like(labels, digits.UNCOND)).float()
        return world.split.train_x[idx].float(), cond, uncond

    return draw


def distill(
    world: DigitsWorld, teacher: TensorDict, method: str, seed: int, progress: bool, dmd_weight: float | None = None
) -> tuple[TensorDict, dict]:
    """Distil `teacher` with `method` (scm / dmd / rcm) by the toy's loop; returns (EMA params, report)."""
    lcfg = loop_settings(world.cfg, method, seed, dmd_weight)
    critic = lcfg.loss.uses_critic
    nets = Networks(world.denoiser, world.denoiser, teacher, world.denoiser if critic else None)
    state = init_state(teacher, teacher if critic else None, lcfg)
    draw = batch_fn(world)
    start = time.perf_counter()
    bar = tqdm(range(world.cfg.iterations), disable=not progress, desc=f"{method} distill", leave=False)
    for _ in bar:
        metrics = train_iteration(state, nets, draw, lcfg)
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k.endswith("loss")})
    return state.ema, {"distill_seconds": time.perf_counter() - start}


def _labels_and_conditions(world: DigitsWorld):
    labels = world.split.held_y  # one sample per held-out digit: the same class counts as the reference
    cond = digits.class_embeddings(world.table, labels).float()
    return labels, cond, digits.class_embeddings(world.table, torch.full_like(labels, digits.UNCOND)).float()


def real_floor(world: DigitsWorld, seed: int) -> torch.Tensor:
    """Training digits with the held-out labels (per class, drawn without replacement): each metric's floor."""
    gen, train_y = torch.Generator().manual_seed(seed + 104729), world.split.train_y
    out = torch.empty_like(world.split.held_x)
    for c in range(digits.NUM_CLASSES):
        where, pool = (world.split.held_y == c).nonzero().flatten(), (train_y == c).nonzero().flatten()
        out[where] = world.split.train_x[pool[torch.randperm(pool.numel(), generator=gen)[: where.numel()]]]
    return out


def teacher_samples(world: DigitsWorld, teacher: TensorDict, seed: int) -> dict[str, torch.Tensor]:
    """{row: samples} of the teacher's Euler sampler (RF time, shift 1, CFG) at each of cfg.teacher_steps."""
    labels, cond, uncond = _labels_and_conditions(world)
    sigma_max, rows = get_preset("toy").sigma_max, {}
    for steps in world.cfg.teacher_steps:
        noise = torch.randn(labels.shape[0], *digits.SHAPE, generator=torch.Generator().manual_seed(seed))
        rf = teacher_rf_times(steps, 1.0, sigma_max)
        x = teacher_euler_sample(world.denoiser, teacher, noise, rf, cond, uncond, world.cfg.guidance)
        rows[f"teacher Euler {steps} (cfg {world.cfg.guidance:g})"] = x
    return rows


def student_samples(world: DigitsWorld, params: TensorDict, name: str, seed: int) -> dict[str, torch.Tensor]:
    """{row: samples} of the few-step consistency sampler at each of cfg.student_steps (the toy studies' mid
    times, with which docs/digits.md was measured)."""
    labels, cond, _ = _labels_and_conditions(world)
    preset, rows = get_preset("toy"), {}
    for steps in world.cfg.student_steps:
        noise = torch.randn(steps, labels.shape[0], *digits.SHAPE, generator=torch.Generator().manual_seed(seed))
        times = consistency_times(steps, preset.sigma_max, TOY_STUDIES_MID_TIMES)
        rows[f"{name} {steps}-step"] = consistency_sample(world.denoiser, params, noise, times, cond)
    return rows


def teacher_reference(world: DigitsWorld, teacher: TensorDict, seed: int) -> torch.Tensor:
    """The teacher's own distribution: its Euler sampler at the most steps of cfg.teacher_steps, with noise
    other than the rows' (so that the teacher row's `fd_teacher` is the sampling floor, not 0)."""
    steps = max(world.cfg.teacher_steps)
    rows = teacher_samples(replace(world, cfg=replace(world.cfg, teacher_steps=(steps,))), teacher, seed + 1_000_003)
    return next(iter(rows.values()))


def evaluate(world: DigitsWorld, rows: dict[str, torch.Tensor], reference: torch.Tensor) -> dict[str, dict[str, float]]:
    """Accuracy, FD, precision and recall of each row against the held-out digits; `fd_teacher` and
    `recall_teacher`, FD and k-NN recall against the teacher's own samples `reference` (how much of the
    teacher's distribution a student reproduces, CFG's departure from the data set aside)."""
    labels, judge = world.split.held_y, world.classifier
    teacher_features = judge.features(reference.double())
    metrics = {}
    for name, x in rows.items():
        features = judge.features(x.double())
        metrics[name] = digits.digit_metrics(judge, x, labels, world.split.held_x) | {
            "fd_teacher": frechet_distance(features, teacher_features),
            "recall_teacher": precision_recall(teacher_features, features)[1],
        }
    return metrics
