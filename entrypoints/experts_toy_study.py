"""`python -m entrypoints.experts_toy_study`: two-expert teacher on the toy, per-expert students vs one student.

The teacher is rcmfn/toy/experts.py's switched analytic teacher. Every design starts from one flow-matching
warm start of the switched teacher and train with the toy preset's rCM settings for the same number of
iterations on the same draws (equal compute: every sample of a batch runs through one network either way):
  experts  (a) one student + one fake score per expert, each seeing only the times of its own range (the
               run's p_G / p_D restricted to the range by routing), the sampler switching at the boundary;
  separate (a) as two independent runs of half the iterations each: the expert's teacher alone, p_G and
               p_D truncated to its range (rcmfn.time.Truncated), the low expert's DMD rollouts starting at
               the boundary from renoised data (LossConfig.rollout_start): what a run per 14B expert does;
  single   (b) one student + one fake score over all times, distilling the two-expert teacher.
Judged against the switched teacher's own 50-step Euler samples (the distribution being distilled): mode
weight TV and sliced W2 to it, plus the toy's metrics against the exact mixture. Results: docs/toy.md.
"""

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import tyro
from tensordict import TensorDict

from entrypoints.presets import TOY_STUDIES_EMA_RATE, TOY_STUDIES_MID_TIMES, get_preset
from rcmfn.loop import LoopConfig, Networks, init_state, train_iteration
from rcmfn.losses import WAN_480P_ELEMENTS
from rcmfn.precond import trigflow_denoiser
from rcmfn.samplers import consistency_sample, consistency_times, teacher_rf_times
from rcmfn.step import LossConfig
from rcmfn.switch import ExpertSwitch, switched_denoiser, switched_teacher_euler_sample
from rcmfn.time import Truncated, UniformShift
from rcmfn.toy import gmm
from rcmfn.toy.experts import expert_mixtures, switched_batch_fn, switched_teacher
from rcmfn.toy.metrics import mode_counts, random_directions, sliced_wasserstein, toy_metrics
from rcmfn.toy.tiny_dit import TinyDiT, TinyDiTConfig, init_params, velocity_net
from rcmfn.toy.warm_start import WarmStartConfig, fit_velocity


@dataclass(frozen=True)
class ExpertsStudyConfig:
    seeds: tuple[int, ...] = (0, 1)
    iterations: int = 600
    """distillation iterations per design and seed"""
    warm_start_steps: int = 1200
    width: int = 64
    depth: int = 2
    boundary_sigma: float = 3.0
    """the switch at sigma_b (r_b = sigma_b / (1 + sigma_b)): inside the band where the toy's modes are decided"""
    weight_power: float = 3.0
    """the high expert's mode weights are w^-power (rcmfn/toy/experts.py)"""
    guidance: float = 2.0
    eval_samples: int = 1200
    batch_size: int = 32
    output: Path = Path("runs/experts_toy_study.json")


def mixture_config() -> gmm.MixtureConfig:
    return gmm.MixtureConfig(std_range=(0.6, 1.0))  # the toy's default problem (entrypoints/toy.py)


def loop_config(cfg: ExpertsStudyConfig, seed: int) -> LoopConfig:
    """The toy preset's rCM settings (entrypoints/presets.py "toy"), as entrypoints.config.loop_config."""
    preset = get_preset("toy")
    loss = LossConfig(
        method="rcm",
        guidance=cfg.guidance,
        loss_scale_dmd=100.0 * preset.dmd_weight,
        dmd_reference_elements=WAN_480P_ELEMENTS,
        p_G=preset.p_G,
        p_D=preset.p_D,
    )
    optim = replace(preset.optim, ema_rate=TOY_STUDIES_EMA_RATE)
    return LoopConfig(loss, optim, preset.tangent_warmup, preset.student_update_freq, seed)


def evaluate(samples, reference, mixture, labels, seed) -> dict:
    """The toy's metrics vs the exact mixture, and mode-weight TV / sliced W2 vs the switched teacher."""
    gen = torch.Generator().manual_seed(seed + 7919)
    metrics = toy_metrics(mixture, samples.double(), labels, gen).as_dict()
    counts, ref = mode_counts(mixture, samples.double(), labels), mode_counts(mixture, reference.double(), labels)
    metrics["teacher_tv"] = 0.5 * (counts / counts.sum() - ref / ref.sum()).abs().sum().item()
    directions = random_directions(mixture.dim, 256, torch.Generator().manual_seed(seed + 31))
    metrics["teacher_sw2"] = sliced_wasserstein(samples.double().flatten(1), reference.double().flatten(1), directions)
    return metrics


def train(denoise, teacher, teacher_params, init, lcfg, iterations, batch_fn, report, name):
    """`iterations` of rCM from `init` (student and fake score alike); returns the EMA weights."""
    nets = Networks(student=denoise, teacher=teacher, teacher_params=teacher_params, fake=denoise)
    state = init_state(init.clone(), init.clone(), lcfg)
    start = time.perf_counter()
    while state.iteration < iterations:
        train_iteration(state, nets, batch_fn, lcfg)
    report[f"{name}_train_seconds"] = time.perf_counter() - start
    return state.ema


def run_seed(cfg: ExpertsStudyConfig, seed: int) -> dict:
    mixture = gmm.build_mixture(mixture_config())
    experts = expert_mixtures(mixture, cfg.weight_power)
    switch = ExpertSwitch(cfg.boundary_sigma / (1.0 + cfg.boundary_sigma), cfg.guidance, cfg.guidance)
    module = TinyDiT(TinyDiTConfig(width=cfg.width, depth=cfg.depth, mlp_ratio=4))
    net = velocity_net(module)
    gen = torch.Generator().manual_seed(seed)
    warm = WarmStartConfig(steps=cfg.warm_start_steps)
    batches = switched_batch_fn(experts, switch, warm.batch_size, UniformShift(1.0))
    start = time.perf_counter()
    params, _ = fit_velocity(net, init_params(module, gen), batches, gen, warm)
    report = {"warm_start_seconds": time.perf_counter() - start}
    student = trigflow_denoiser(net, net_dtype=torch.float32)
    teacher = switched_teacher(switch)
    lcfg = loop_config(cfg, seed)

    def batch_fn(g):
        labels = torch.randint(0, mixture.num_classes, (cfg.batch_size,), generator=g)
        x0 = gmm.sample_mixture(mixture, labels, g).float()
        cond = gmm.class_embeddings(mixture, labels).float()
        return x0, cond, gmm.class_embeddings(mixture, torch.full_like(labels, gmm.UNCOND)).float()

    labels = torch.arange(cfg.eval_samples) % mixture.num_classes
    cond = gmm.class_embeddings(mixture, labels)
    uncond = gmm.class_embeddings(mixture, torch.full_like(labels, gmm.UNCOND))
    noise = torch.randn(4, cfg.eval_samples, *mixture.shape, generator=torch.Generator().manual_seed(seed + 1))
    exact = trigflow_denoiser(gmm.velocity, time_dtype=torch.float64)
    pair = {"high": (exact, experts["high"]), "low": (exact, experts["low"])}
    rf = teacher_rf_times(50, 1.0, 80.0)
    reference = switched_teacher_euler_sample(pair, switch, noise[0].double(), rf, cond, uncond)
    rows = {"switched teacher Euler 50": evaluate(reference, reference, mixture, labels, seed)}
    rows["exact data (low expert's mixture)"] = evaluate(
        gmm.sample_mixture(mixture, labels, torch.Generator().manual_seed(seed + 2)), reference, mixture, labels, seed
    )
    switched_student = switched_denoiser(student, student, switch)
    runs = {  # design -> (student's params, sampled by)
        "single": (train(student, teacher, experts, params, lcfg, cfg.iterations, batch_fn, report, "single"), student),
        "experts": (
            train(
                switched_student,
                teacher,
                experts,
                TensorDict(high=params, low=params),
                lcfg,
                cfg.iterations,
                batch_fn,
                report,
                "experts",
            ),
            switched_student,
        ),
    }
    separate = {}
    for name in ("high", "low"):  # each expert alone, over its own range, half the iterations each
        lo, hi = switch.trig_range(name)
        loss = replace(
            lcfg.loss,
            p_G=Truncated(lcfg.loss.p_G, lo, hi),
            p_D=Truncated(lcfg.loss.p_D, lo, hi),
            rollout_start=None if name == "high" else hi,
        )
        separate[name] = train(
            student,
            exact,
            experts[name],
            params,
            replace(lcfg, loss=loss),
            cfg.iterations // 2,
            batch_fn,
            report,
            f"separate_{name}",
        )
    runs["separate"] = (TensorDict(separate), switched_student)
    for name, (ema, denoise) in runs.items():
        for steps in (1, 2, 4):
            times = consistency_times(steps, 80.0, TOY_STUDIES_MID_TIMES)
            samples = consistency_sample(denoise, ema, noise[:steps], times, cond.float())
            rows[f"{name} {steps}-step"] = evaluate(samples, reference, mixture, labels, seed)
    return {"rows": rows, **report}


def main() -> None:
    cfg = tyro.cli(ExpertsStudyConfig)
    torch.set_num_threads(1)
    results = {"config": {k: str(v) for k, v in vars(cfg).items()}, "seeds": {}}
    for seed in cfg.seeds:
        results["seeds"][seed] = run_seed(cfg, seed)
        print(json.dumps(results["seeds"][seed], indent=1), flush=True)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps(results, indent=1))
    names = next(iter(results["seeds"].values()))["rows"]
    columns = ("teacher_tv", "teacher_sw2", "off_mode", "spread", "coverage")
    print("| sampler | " + " | ".join(f"{c} (mean of {len(cfg.seeds)})" for c in columns) + " |")
    for name in names:
        means = [sum(r["rows"][name][c] for r in results["seeds"].values()) / len(cfg.seeds) for c in columns]
        print(f"| {name} | " + " | ".join(f"{m:.4f}" for m in means) + " |")


if __name__ == "__main__":
    main()
