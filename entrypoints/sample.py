"""`python -m entrypoints.sample`: 1-4 step samples of a distilled student beside its teacher, with timings.

Toy (`--model toy --run runs/toy`): redraws the distill run's figure from its newest checkpoint and prints
sample metrics, seconds per sampler and the speed-up. Real models: prompts through the text encoder, the
student's consistency sampler and the teacher's Euler sampler (CFG) from the same seeded noise, latents
through the VAE into PNG / MP4 per sample and a contact sheet (rows: samplers; columns: prompt x seed).
SPEC-rcm §6 (samplers), SPEC-models §4 (encoders, VAE). Reading order: SampleConfig, sample_model.
"""
# size budget: ~390 lines, over the 250 of an entrypoint: two paths (the toy's figure and metrics, real models
# with media) behind 27 documented flags. The model wiring (time input, condition mask) is the spec's
# (`ModelSpec.velocity_net`, rcmfn/models/family.py).

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import tyro
from safetensors.torch import load_file, save_file
from tensordict import TensorDict

from entrypoints import toy as toy_world
from entrypoints.image_condition import sampling_conditions
from entrypoints.presets import MODELS as PRESETS
from entrypoints.run_exports import export_name
from entrypoints.run_folder import is_training_checkpoint, newest_training_checkpoint, training_weights
from entrypoints.sample_experts import load_expert_pair, switched_student, teacher_row
from rcmfn import codecs, media
from rcmfn.atomic import write_json_atomically
from rcmfn.condition import text_of, with_text
from rcmfn.models.checkpoint import IDENTITY, load_into_meta_module
from rcmfn.models.registry import MODELS, ModelSpec, get_spec, trainable_spec, unconditional_prompt
from rcmfn.precond import check_guidance, trigflow_denoiser
from rcmfn.samplers import (
    PAPER_MID_TIMES,
    consistency_sample,
    consistency_times,
    teacher_euler_sample,
    teacher_rf_times,
)
from rcmfn.toy import gmm
from rcmfn.toy.tiny_dit import TinyDiTConfig
from rcmfn.toy.warm_start import WarmStartConfig
from rcmfn.train_checkpoint import read_state

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SampleConfig:
    """Sample a distilled student (and its teacher); unset values take the run's or the model's default."""

    model: str = "toy"
    """'toy' or a network of rcmfn/models/registry.py (wan1.3b, wan14b, cosmos2b, ...)"""
    run: Path | None = None
    """run folder of entrypoints.distill: its newest checkpoint supplies the student"""
    checkpoint: Path | None = None
    """student weights when no run folder is given: a training checkpoint folder (step-N) or an exported .safetensors"""
    layout: str = "official"
    """key layout of an exported --checkpoint / --teacher (official, diffusers); training checkpoints use ours"""
    strict: bool = True
    """checkpoint keys and shapes must match the network; off: print mismatches, fresh-init what a file lacks"""
    weights: Literal["ema", "student"] = "ema"
    """which weights of a training checkpoint to sample"""
    teacher: Path | None = None
    """teacher checkpoint for the side-by-side rows (real models; the toy's teacher is analytic)"""
    text_encoder: Path | None = None
    """local text-encoder folder (T5-XXL for Cosmos, umT5-XXL for Wan; HF layout, never downloaded)"""
    vae: Path | None = None
    """local Wan2.1 VAE folder (diffusers layout); without it only latents.safetensors is written"""
    image: Path | None = None
    """image-to-video models: the first frame (image file, centre-cropped to the size); needs --vae"""
    image_encoder: Path | None = None
    """image-to-video models: local CLIP vision folder (HF layout, never downloaded)"""
    prompts: tuple[str, ...] = ()
    """prompts to sample (real models)"""
    prompt_file: Path | None = None
    """text file with one prompt per non-empty line (added to the prompts)"""
    negative_prompt: str | None = None
    """teacher CFG's negative prompt (default: Wan's default negative prompt for Wan; all-zero text
    embedding for Cosmos, also when empty)"""
    steps: tuple[int, ...] = (1, 2, 4)
    """student step counts to sample"""
    sigma_max: float | None = None
    """start noise level sigma_max (default: the model preset's; 80 without one)"""
    mid_times: tuple[float, ...] | None = None
    """intermediate trig times of the multi-step student (default: the model preset's own: Cosmos and the
    paper 1.3 1.0 0.6, Wan's inference script 1.5 1.4 1.0)"""
    teacher_steps: int = 50
    """teacher Euler steps (0: no teacher rows)"""
    guidance: float | None = None
    """teacher CFG weight w >= 1 (standard form F_u + w (F_c - F_u); applied only when w > 1; default: the
    run's / preset's)"""
    shift: float | None = None
    """teacher time shift (default: the model preset's: 5.0 Wan T2V, 3.0 I2V 480p, 12.0 Wan2.2 A14B; toy 1.0)"""
    seeds: tuple[int, ...] = (0,)
    """noise seeds; every prompt is sampled once per seed, all samplers from the same noise"""
    batch: int = 1
    """samples per network call (real models)"""
    height: int | None = None
    """pixel height (default: the model's training resolution)"""
    width: int | None = None
    """pixel width (default: the model's training resolution)"""
    frames: int | None = None
    """pixel frames, 1 + 4k; 1 writes PNG, more MP4 (default: the model's training frames: Wan 1.3B 77,
    14B 81, Cosmos T2I 1)"""
    fps: int | None = None
    """MP4 frame rate (default: the model preset's, Wan2.1 16, Wan2.2 TI2V-5B 24)"""
    dtype: Literal["bfloat16", "float32", "float64"] = "bfloat16"
    """network weights dtype (real models)"""
    device: str | None = None
    """torch device (default cuda if available, else cpu)"""
    output: Path = Path("samples")
    """output folder"""

    def __post_init__(self):
        if self.model != "toy":
            get_spec(self.model)
        if self.guidance is not None:
            check_guidance(self.guidance, "--guidance")
        mid_times = sampler_mid_times(self)
        if not self.steps or min(self.steps) < 1 or max(self.steps) > len(mid_times) + 1:
            raise ValueError(
                f"steps must lie in 1..{len(mid_times) + 1} (one more than the mid times {mid_times}); got {self.steps}"
            )
        for name in ("teacher_steps", "batch", "fps"):
            if getattr(self, name) is not None and getattr(self, name) < (0 if name == "teacher_steps" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'teacher_steps' else 1}; got {getattr(self, name)}")
        if self.checkpoint is not None and self.run is not None:
            raise ValueError("give either --run or --checkpoint, not both")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for name in ("sigma_max", "shift"):  # 0 used to mean "unset" and silently became the default
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0 (leave it unset for the default); got {value}")


def sampler_mid_times(cfg: SampleConfig) -> tuple[float, ...]:
    """--mid-times, else the model preset's own, else the paper's evaluation grid (rcmfn.samplers)."""
    if cfg.mid_times is not None:
        return tuple(cfg.mid_times)
    return PRESETS[cfg.model].mid_times if cfg.model in PRESETS else PAPER_MID_TIMES


EXPORT = export_name("official")  # entrypoints.distributed's final EMA export, official key layout


def student_weights(cfg: SampleConfig):
    """(weights: a path or tensors read, in our key names?) from --checkpoint, or from --run: its newest
    training checkpoint of either runner (a sharded run's DCP shards are read in this process), else
    the EMA export of a sharded run."""
    folder = cfg.checkpoint
    if cfg.run is not None:
        folder = newest_training_checkpoint(cfg.run)
        if folder is None and (cfg.run / EXPORT).is_file() and cfg.weights == "ema":
            return cfg.run / EXPORT, False
        if folder is None:
            raise FileNotFoundError(
                f"run folder {cfg.run} has no complete checkpoint under checkpoints/ and no {EXPORT}"
            )
    if folder is None:
        raise ValueError("no student: pass --run (a distill run folder) or --checkpoint")
    if is_training_checkpoint(folder):
        return training_weights(folder, cfg.weights), True
    if not folder.exists():
        raise FileNotFoundError(f"student checkpoint not found: {folder}")
    return folder, False


def synced(device: torch.device) -> float:
    """perf_counter after the device's queued work has finished (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def speedup_table(rows: dict, teacher: str | None) -> str:
    lines = [f"{'sampler':32}{'NFE':>6}{'s/sample':>12}{'speed-up':>10}"]
    for name, row in rows.items():
        ratio = f"{rows[teacher]['seconds_per_sample'] / row['seconds_per_sample']:9.1f}x" if teacher else ""
        lines.append(f"{name:32}{row['nfe']:6d}{row['seconds_per_sample']:12.4f}{ratio:>10}")
    return "\n".join(lines)


def toy_world_from(saved: dict) -> toy_world.ToyWorld:
    """The toy world of a distill run's saved config; the checkpoint's weights replace its warm start."""
    mixture = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["toy"]["mixture"].items()}
    cfg = toy_world.ToyConfig(
        mixture=gmm.MixtureConfig(**mixture),
        net=TinyDiTConfig(**saved["toy"]["net"]),
        warm_start=WarmStartConfig(steps=1, batch_size=1),
        eval_samples=saved["toy"]["eval_samples"],
    )
    return toy_world.build_toy(cfg, saved["seed"], progress=False)


def sample_toy(cfg: SampleConfig) -> dict:
    """Toy: the distill run's figure from a checkpoint, metrics and seconds of every sampler row."""
    path, ours = student_weights(cfg)
    if not ours:
        raise ValueError(f"--model toy needs a distill run folder or a training checkpoint folder; got {path}")
    toy_mid_times = PRESETS["toy"].mid_times  # entrypoints/toy.py sample_student has no mid-times argument
    if sampler_mid_times(cfg) != toy_mid_times:
        raise ValueError(f"the toy samples with the default mid times {toy_mid_times}; got {cfg.mid_times}")
    saved = read_state(path.parent)["config"]
    world = toy_world_from(saved)
    params = TensorDict(load_file(path), batch_size=[])
    if set(params.keys()) != set(world.init_params.keys()):
        diff = sorted(set(params.keys()) ^ set(world.init_params.keys()))
        raise ValueError(f"{path} does not fit the run's toy net; keys in one but not the other: {diff}")
    preset = PRESETS["toy"]
    guidance = next(g for g in (cfg.guidance, saved.get("guidance"), preset.guidance) if g is not None)
    sigma_max = preset.sigma_max if cfg.sigma_max is None else cfg.sigma_max
    shift = 1.0 if cfg.shift is None else cfg.shift
    cfg.output.mkdir(parents=True, exist_ok=True)
    report = {}
    for seed in cfg.seeds:
        runs = {
            f"student {k}-step": (k, partial(toy_world.sample_student, world, params, k, seed, sigma_max))
            for k in cfg.steps
        }
        if cfg.teacher_steps:
            runs[f"teacher Euler {cfg.teacher_steps} (cfg {guidance:g})"] = (
                cfg.teacher_steps * (2 if guidance > 1.0 else 1),
                partial(toy_world.sample_teacher, world, cfg.teacher_steps, guidance, seed, shift, sigma_max),
            )
        rows = {}
        for name, (nfe, fn) in runs.items():
            start = time.perf_counter()
            samples = fn()
            seconds = time.perf_counter() - start
            rows[name] = toy_world.evaluate(world, samples, seed) | {
                "seconds": seconds,
                "nfe": nfe,
                "seconds_per_sample": seconds / samples.shape[0],
            }
        figure = cfg.output / ("samples.png" if len(cfg.seeds) == 1 else f"samples-seed{seed}.png")
        toy_world.save_figure(world, params, seed, figure, guidance)
        report[f"seed {seed}"] = {"rows": rows, "figure": str(figure), "checkpoint": str(path)}
    write_json_atomically(cfg.output / "metrics.json", report, indent=2)
    return report


def load_denoiser(spec: ModelSpec, path: Path, ours: bool, cfg: SampleConfig, device: torch.device):
    """(denoise, params) of the network in `path`; strict loads raise listing every key problem,
    non-strict ones (--no-strict) print them and fresh-initialise what the file lacks."""
    if not ours and cfg.layout not in spec.key_maps:
        raise ValueError(f"unknown --layout {cfg.layout!r}; valid: {sorted(spec.key_maps)}")
    with torch.device("meta"):
        module = spec.build(spec.config)
    key_map = IDENTITY if ours else spec.key_maps[cfg.layout]
    fresh = None if cfg.strict else torch.Generator().manual_seed(0)
    report = load_into_meta_module(module, path, key_map, DTYPES[cfg.dtype], device, cfg.strict, fresh)
    if not report.ok or report.initialised:
        print(f"non-strict load (--no-strict):\n{report.describe()}", flush=True)
    params = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return trigflow_denoiser(spec.velocity_net(module.eval()), net_dtype=DTYPES[cfg.dtype]), params


def run_sampler(fn, noises: torch.Tensor, conds: torch.Tensor, batch: int, device: torch.device, warmup=False):
    """fn(noise [S, b, ...], cond [b, L, D]) over all samples in batches -> (x0 on CPU float32, seconds).

    `warmup` runs the first batch once untimed first (CUDA context, kernel selection, allocator).
    """
    if warmup:
        fn(noises[:, :batch].to(device), conds[:batch].to(device))
    outs, seconds = [], 0.0
    for i in range(0, noises.shape[1], batch):
        noise, cond = noises[:, i : i + batch].to(device), conds[i : i + batch].to(device)
        start = synced(device)
        outs.append(fn(noise, cond).float().cpu())
        seconds += synced(device) - start
    return torch.cat(outs), seconds


def sample_model(cfg: SampleConfig, spec: ModelSpec) -> dict:
    """Real model: encode prompts, sample student (and teacher), decode, write media, sheet and timings."""
    prompts = list(cfg.prompts) + (
        [p for p in cfg.prompt_file.read_text().splitlines() if p.strip()] if cfg.prompt_file else []
    )
    if not prompts:
        raise ValueError("no prompts: pass --prompts or --prompt-file")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    frames, height, width = spec.pixel_shape  # the model's training size
    shape = codecs.latent_shape(
        cfg.frames or frames, cfg.height or height, cfg.width or width, spec.vae_stride, spec.channels
    )
    student_path, ours = student_weights(cfg)
    if cfg.teacher is not None and not cfg.teacher.exists():  # fail before minutes of sampling, not after
        raise FileNotFoundError(f"teacher checkpoint not found: {cfg.teacher}")
    if cfg.vae is not None:
        codecs.resolve_folder(cfg.vae, "vae", "VAE", "--vae")
    encoder = codecs.load_text_encoder(cfg.text_encoder, device, DTYPES[cfg.dtype], spec.text_len)
    if encoder.dim != spec.text_dim:
        raise ValueError(f"text encoder width {encoder.dim} != {cfg.model}'s text width {spec.text_dim}")
    negative = unconditional_prompt(spec, cfg.negative_prompt)  # the rule prepare used for the shards
    cond_prompts = encoder.encode(prompts).cpu()
    if negative is None:
        uncond = torch.zeros_like(cond_prompts[:1])
    else:
        uncond = encoder.encode([negative], what="negative prompt").cpu()
    del encoder
    jobs = [(p, s) for p in range(len(prompts)) for s in cfg.seeds]
    # Per-sample noise from its own seed: results do not depend on --batch, and all samplers share noise[0].
    noises = torch.stack(
        [torch.randn(max(cfg.steps), *shape, generator=torch.Generator().manual_seed(s)) for _, s in jobs], dim=1
    )
    conds = sampling_conditions(spec, cfg, cond_prompts[[p for p, _ in jobs]], shape, device)  # + image (I2V)
    if cfg.sigma_max is not None:
        sigma_max = cfg.sigma_max
    else:
        sigma_max = PRESETS[cfg.model].sigma_max if cfg.model in PRESETS else 80.0
    latents, rows = {}, {}
    # The student computes as distillation trained it (float32 time path); the teacher as released.
    load = lambda spec, path: load_denoiser(spec, path, ours, cfg, device)  # noqa: E731
    if spec.experts is None:
        denoise, params = load(trainable_spec(spec), student_path)
    else:  # two experts (Wan2.2 A14B): a folder per expert, switched at the boundary (entrypoints/sample_experts.py)
        pair = load_expert_pair(trainable_spec(spec), student_path, cfg.layout, load)
        denoise, params = switched_student(pair, spec.experts)
    for k in cfg.steps:
        times = consistency_times(k, sigma_max, sampler_mid_times(cfg))
        latents[f"student {k}-step"], seconds = run_sampler(
            lambda n, c, k=k, times=times: consistency_sample(denoise, params, n[:k], times, c),
            noises,
            conds,
            cfg.batch,
            device,
            warmup=k == cfg.steps[0],
        )
        rows[f"student {k}-step"] = {"nfe": k, "seconds_per_sample": seconds / len(jobs)}
    del denoise, params
    teacher = None
    if cfg.teacher is not None and cfg.teacher_steps:
        preset = PRESETS.get(cfg.model)
        guidance = cfg.guidance if cfg.guidance is not None else (preset.guidance if preset else 5.0)
        rf = teacher_rf_times(cfg.teacher_steps, cfg.shift or (preset.teacher_shift if preset else 5.0), sigma_max)
        if spec.experts is None:
            denoise, params = load_denoiser(spec, cfg.teacher, False, cfg, device)
            teacher = f"teacher Euler {cfg.teacher_steps} (cfg {guidance:g})"
            nfe = cfg.teacher_steps * (2 if guidance > 1.0 else 1)
            negative = uncond[0]  # CFG swaps the text only, an image condition stays (rcmfn.condition)
            fn = lambda n, c: teacher_euler_sample(  # noqa: E731
                denoise, params, n[0], rf, c, with_text(c, negative.to(text_of(c))), guidance
            )
        else:
            pair = load_expert_pair(spec, cfg.teacher, cfg.layout, lambda s, p: load_denoiser(s, p, False, cfg, device))
            teacher, nfe, fn = teacher_row(pair, spec.experts, rf, uncond, cfg.guidance)
        latents[teacher], seconds = run_sampler(fn, noises, conds, cfg.batch, device)
        rows[teacher] = {"nfe": nfe, "seconds_per_sample": seconds / len(jobs)}
        del fn
    cfg.output.mkdir(parents=True, exist_ok=True)
    slug = lambda name: name.split(" (")[0].replace(" ", "-")  # noqa: E731
    save_file({slug(n): x.contiguous() for n, x in latents.items()}, cfg.output / "latents.safetensors")
    report = {"prompts": prompts, "jobs": jobs, "rows": rows, "latent_shape": list(shape)}
    if cfg.vae is not None:
        report["files"] = decode_and_write(cfg, spec, latents, jobs, prompts, device, rows)
    write_json_atomically(cfg.output / "timings.json", report, indent=2, ensure_ascii=False)
    report["table"] = speedup_table(rows, teacher)
    return report


def decode_and_write(
    cfg: SampleConfig, spec: ModelSpec, latents: dict, jobs: list, prompts: list, device, rows: dict
) -> list:
    """VAE-decode every sampler's latents; one PNG/MP4 per sample and contact_sheet.png (first frames)."""
    vae = codecs.load_vae(cfg.vae, device, stride=spec.vae_stride, channels=spec.channels)
    fps = cfg.fps or (PRESETS[cfg.model].fps if cfg.model in PRESETS else 16)
    files, sheet = [], {}
    for name, x0 in latents.items():
        start, first_frames = synced(device), []
        for i in range(0, x0.shape[0], cfg.batch):
            for j, pixels in enumerate(vae.decode(x0[i : i + cfg.batch]).cpu(), start=i):
                frames = media.to_uint8(pixels)
                stem = cfg.output / name.split(" (")[0].replace(" ", "-") / f"p{jobs[j][0]:03d}-s{jobs[j][1]}"
                files.append(str(media.write_media(stem, frames, fps)))
                first_frames.append(frames[0])
        rows[name]["decode_seconds_per_sample"] = (synced(device) - start) / x0.shape[0]
        sheet[name] = first_frames
    labels = [f"p{p} s{s}: {prompts[p]}" for p, s in jobs]
    files.append(str(media.write_png(cfg.output / "contact_sheet.png", media.contact_sheet(sheet, labels))))
    return files


def main() -> None:
    choices = ", ".join(["toy", *MODELS])
    cfg = tyro.cli(SampleConfig, description=__doc__.splitlines()[0] + f" Models: {choices}.")
    if cfg.model == "toy":
        torch.set_num_threads(1)  # distill's --cpu-threads default: the toy's tensors gain nothing from more
        for seed, result in sample_toy(cfg).items():
            print(f"{seed}\n{toy_world.format_table(result['rows'])}")
            teacher = next((n for n in result["rows"] if n.startswith("teacher")), None)
            print(speedup_table(result["rows"], teacher), f"\nfigure: {result['figure']}")
        return
    report = sample_model(cfg, get_spec(cfg.model))
    print(report["table"])
    print(f"outputs in {cfg.output} ({len(report.get('files', []))} media files; latents.safetensors, timings.json)")


if __name__ == "__main__":
    main()
