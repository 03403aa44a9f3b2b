"""Every setting of `python -m entrypoints.distill` (DistillConfig, with the sharded path's DistributedConfig
in its `distributed` field), how the model preset fills the unset ones (`loop_config`, `total_iterations`),
and what a checkpoint must share with the run that resumes it (`fingerprint`; `run_folder.check_resume_length`).
(size budget: every distill flag and its help live in these two dataclasses, so --help is read in one place.)
"""

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from entrypoints import toy as toy_world
from entrypoints.expert_run import check_expert, expert_loss
from entrypoints.image_condition import image_fraction_of
from entrypoints.presets import RolloutTimes, get_preset
from rcmfn.loop import LoopConfig
from rcmfn.lora import LORA_LR_SCALE, LoraConfig
from rcmfn.precond import check_guidance
from rcmfn.stages import Stage, parse_stages
from rcmfn.stages import total_iterations as stages_total
from rcmfn.step import LossConfig
from rcmfn.time import LogNormal


@dataclass(frozen=True)
class DistributedConfig:
    """Settings of the sharded path (--model other than toy); the rest of DistillConfig applies too."""

    data: Path | None = None
    """shard folder written by `python -m entrypoints.prepare` (rcmfn.shards format)"""
    teacher: Path | None = None
    """teacher checkpoint (.safetensors, sharded folder, .pt); student and fake score start from it"""
    teacher_layout: str = "official"
    """key layout of the teacher checkpoint (a key of the model's key maps, e.g. official, diffusers)"""
    strict: bool = True
    """teacher keys and shapes must match the network; off: print mismatches, fresh-init what the file lacks"""
    random_init: bool = False
    """random teacher weights instead of a checkpoint (benchmarks only)"""
    batch_size: int = 1
    """samples per data-parallel rank per iteration (global batch = batch_size x dp)"""
    dp_replicate: int = 1
    """HSDP replicas"""
    dp_shard: int = -1
    """FSDP shard degree; -1 = world size / (dp_replicate x cp)"""
    cp: int = 1
    """Ulysses context-parallel degree; must divide the heads and the tokens"""
    dtype: Literal["bfloat16", "float32", "float64"] = "bfloat16"
    """compute dtype of the networks; trainable weights are stored in float32 (float64 for float64)"""
    ac: Literal["none", "full", "mm_only"] = "none"
    """activation checkpointing per block (SPEC-rcm §8.7: full for 1.3B, mm_only for 14B)"""
    allow_eager_tangent: bool = False
    """used when --compile is on: a block whose tangent (JVP) graph cannot be compiled (seen: context-parallel blocks on
    torch 2.13) runs its tangent pass eagerly, exact but slower, and the metrics count it
    (eager_tangent_blocks); without this flag such a run stops with an error"""
    keep_checkpoints: int = 2
    """complete checkpoints kept"""
    save_at_end: bool = True
    """write a checkpoint after the last iteration (off for benchmarks)"""
    export: bool = True
    """write the EMA student at the end, in each of --distributed.export-layouts"""
    export_layouts: tuple[str, ...] = ("official",)
    """key layouts of that export: official -> student_ema.safetensors, another -> student_ema.<layout>.safetensors,
    diffusers-folder -> student_ema.diffusers/ (a folder diffusers' from_pretrained loads, with a model card)"""

    def __post_init__(self):
        if self.batch_size < 1 or self.keep_checkpoints < 1:
            raise ValueError(
                f"batch_size and keep_checkpoints must be >= 1; got {self.batch_size}, {self.keep_checkpoints}"
            )


@dataclass(frozen=True)
class DistillConfig:
    """Distil a teacher into a 1-4 step student. Unset hyperparameters take the model preset's value."""

    model: str = "toy"
    """model preset: one of the keys of entrypoints/presets.py MODELS (toy, wan1.3b, wan14b, cosmos2b, ...)"""
    method: Literal["rcm", "scm", "dmd", "dcm", "dcm+dmd"] = "rcm"
    """rcm = sCM + lambda * DMD; scm = consistency only; dmd = score distillation only; dcm = discrete CM;
    dcm+dmd = dCM + lambda * DMD (the official cm_type=dcm with a fake score)"""
    stages: str | None = None
    """train in stages instead of one --method, e.g. dcm:500,scm:750,rcm:1250 (the official README's dCM
    warm-up -> sCM -> sCM + DMD); the stages set the run's length and each stage restarts the schedules,
    optimisers and EMA (rcmfn/stages.py). Unset: one stage of --method (the official runs, and the default)"""
    output: Path = Path("runs/toy")
    """run folder: checkpoints/, metrics.jsonl, metrics.json, samples.png, config.json"""
    iterations: int | None = None
    """total iterations (student + critic), >= 1; preset value if unset"""
    dmd_weight: float | None = None
    """lambda of L_sCM + lambda L_DMD (paper: 0.01), scaled by sqrt(N_ref / N) when the reference size below
    is set; stored as loss_scale_dmd = lambda * sCM loss_scale; preset value if unset (0.01 but for the toy)"""
    dmd_reference_elements: int | None = None
    """N_ref: lambda acts as lambda * sqrt(N_ref / N) on latents of N = C*T*H*W elements, so the DMD:sCM
    gradient balance does not depend on the latent size (sCM's direction is normalised per sample, DMD's
    per element). 2096640 = Wan 480p (16x21x60x104), where the paper's lambda = 0.01 was set: with it,
    lambda is the paper's lambda at any size (0.01 acts as 0.01 on Wan 480p, 0.028 on a 1024 px Cosmos
    latent, 0.905 on the toy's 256 elements). 0 = the official loss (balance grows like sqrt(N)); preset
    value if unset (0 but for the toy)"""
    guidance: float | None = None
    """teacher CFG weight w >= 1 (standard form F_u + w (F_c - F_u); applied only when w > 1); preset value
    if unset; an expert run's default is its expert's own"""
    expert: Literal["high", "low"] | None = None
    """two-expert models (wan2.2-*): the expert this run distils over its own time range (entrypoints/expert_run.py)"""
    student_lr: float | None = None
    """student AdamW learning rate; preset value if unset (times 10 for LoRA adapters, LORA_LR_SCALE)"""
    fake_lr: float | None = None
    """fake-score AdamW learning rate; preset value if unset (times 10 for LoRA adapters, LORA_LR_SCALE)"""
    ema_rate: float | None = None
    """relative std of the student's power EMA (EDM2; SPEC-rcm §7: 0.1 in the official code, 0.05 in the
    paper's Table 4), in (0, 0.2887); preset value if unset"""
    tangent_warmup: int | None = None
    """tangent warm-up iterations H (also the sCM-only prefix); preset value if unset"""
    student_update_freq: int | None = None
    """one student step every F iterations after warm-up; preset value if unset"""
    p_g_mean: float | None = None
    """mean of log sigma for the sCM time distribution p_G (LogNormal); preset value if unset"""
    mid_times: tuple[float, ...] | None = None
    """trig times t = atan(sigma) between atan(sigma_max) and 0 of the toy evaluation's few-step sampler
    (k steps use the first k - 1; the evaluation samples 1, 2 and 4 steps) and, with --rollout-times
    mid-times, of the training rollouts; preset value if unset"""
    rollout_times: RolloutTimes | None = None
    """mid times of the student's rollouts that DMD and the fake score learn from: drawn = t_n ~ p_D as a running
    minimum (the official default); mid-times = the sampler's own --mid-times (or the preset's), so DMD
    corrects the very path the few-step sampler takes (the official dmd_fix_timesteps, whose fixed times are
    its sampler's 1.5, 1.4, 1.0; SPEC-rcm §3). Preset value if unset (drawn but for the toy; docs/toy.md)"""
    max_rollout_steps: int | None = None
    """rollouts cycle through 1..N steps, one more each student / critic step (the official
    max_simulation_steps_fake, 4); preset value if unset (4 but for the toy)"""
    tangent_method: Literal["jvp", "semi_fd", "fd"] = "jvp"
    """sCM tangent: full torch.func.jvp, jvp in x plus finite difference in t, or finite differences"""
    seed: int = 0
    """seed of every random draw (per-iteration generators derive from it)"""
    save_every: int = 400
    """iterations between checkpoints (one is always written at the end)"""
    log_every: int = 20
    """iterations between metric lines in metrics.jsonl"""
    resume: bool = True
    """continue from the newest complete checkpoint in the output folder, if there is one"""
    overwrite: bool = False
    """a run that resumes nothing deletes the checkpoints already in the output folder (without: refused)"""
    compile: bool = False
    """torch.compile(fullgraph=True) the student's forward and jvp"""
    progress: bool = True
    """show progress bars"""
    max_bad_steps: int = 3
    """stop with an error after this many consecutive skipped (non-finite gradient) or fully masked
    (every sample's loss non-finite) steps of one network; a skipped step changes no weight"""
    cpu_threads: int = 0
    """torch intra-op CPU threads; 0 = torch default (all cores: the toy's width-128 student steps 1.4-1.5x
    faster on 2 idle cores than on 1). Use 1 on a machine whose cores other jobs share: oversubscribed
    OpenMP threads ran a warm-start step 5x slower there"""
    image_fraction: float | None = None
    """share of samples trained image-to-video, conditioned on their own first latent frame (kept clean, as
    the image; the rest text-to-video), for nets with that mode (wan2.2-ti2v-5b); preset value if unset"""
    lora_rank: int = 0
    """train student and fake score as rank-R adapters on the frozen teacher (rcmfn/lora.py); 0 = full fine-tuning"""
    lora_alpha: float | None = None
    """adapter scale numerator: weight delta = (alpha / rank) up @ down; unset = the rank (scale 1)"""
    lora_targets: tuple[str, ...] = ("attention", "ffn")
    """adapted weights: attention (self/cross q, k, v, o), ffn, modulation (the adaLN modulation linears)"""
    lora_full: tuple[str, ...] = ()
    """also train in full beside the adapters, at 1/10 of their rate: biases, outside-blocks (embeddings,
    positions, head). With both a rank-8 toy student is as good as full fine-tuning (docs/toy.md "LoRA")"""
    toy: toy_world.ToyConfig = field(default_factory=toy_world.ToyConfig)
    """toy problem settings (only with --model toy)"""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """sharded-run settings (every --model but toy; run under torchrun)"""

    def __post_init__(self):
        get_preset(self.model)
        check_expert(self.model, self.expert)
        if self.guidance is not None:
            check_guidance(self.guidance, "--guidance")
        if self.dmd_weight is not None and (self.dmd_weight < 0 or not math.isfinite(self.dmd_weight)):
            raise ValueError(f"dmd_weight must be finite and >= 0; got {self.dmd_weight}")
        if self.dmd_reference_elements is not None and self.dmd_reference_elements < 0:
            raise ValueError(f"dmd_reference_elements must be >= 0 (0 = off); got {self.dmd_reference_elements}")
        mid = self.mid_times
        if mid is not None and (
            len(mid) < 3 or any(not 0 < m < math.pi / 2 for m in mid) or list(mid) != sorted(mid)[::-1]
        ):
            raise ValueError(f"mid_times must be >= 3 non-increasing trig times in (0, pi/2); got {mid}")
        if self.method == "dmd" and self.tangent_warmup not in (None, 0):
            raise ValueError(f"method 'dmd' has no sCM term, so tangent_warmup must be 0; got {self.tangent_warmup}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be >= 1 (unset: the preset's); got {self.iterations}")
        if self.stages is not None and self.method != "rcm":
            raise ValueError(f"--stages sets each stage's method: leave --method unset (got {self.method!r})")
        total = None if self.stages is None else stages_total(parse_stages(self.stages))  # names a bad stage
        if total is not None and self.iterations not in (None, total):
            raise ValueError(f"--iterations {self.iterations} differs from the {total} that --stages adds up to")
        for name in ("save_every", "log_every", "max_bad_steps", "student_update_freq", "max_rollout_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("student_lr", "fake_lr", "tangent_warmup", "cpu_threads", "seed"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0; got {value}")
        steps, mids = self.max_rollout_steps or get_preset(self.model).max_rollout_steps, mid_times(self)
        if rollout_times(self) == "mid-times" and steps - 1 > len(mids):
            raise ValueError(f"--rollout-times mid-times: {steps}-step rollouts need {steps - 1} mid times; got {mids}")
        if self.p_g_mean is not None and not math.isfinite(self.p_g_mean):
            raise ValueError(f"p_g_mean must be finite; got {self.p_g_mean}")
        if self.toy.batch_size < 1 or self.toy.eval_samples < 1:  # checked here, before the warm start
            raise ValueError(
                f"toy.batch_size and toy.eval_samples must be >= 1; got {self.toy.batch_size}, {self.toy.eval_samples}"
            )
        lora_config(self)  # names a bad rank, alpha, target or full-training scope
        image_fraction_of(self)  # names a bad share, or one for a model without the mode
        run_stages(self)  # the preset merged with these values: its own checks run now, before any work


def loop_config(cfg: DistillConfig) -> LoopConfig:
    """Merge the preset with the command-line overrides."""
    preset = get_preset(cfg.model)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    loss = LossConfig(  # paper's L_sCM + lambda L_DMD as the official 100 L_sCM + 100 lambda L_DMD (§3)
        method=cfg.method,
        guidance=pick(cfg.guidance, preset.guidance),
        loss_scale=100.0,
        loss_scale_dmd=1.0 if cfg.method == "dmd" else 100.0 * pick(cfg.dmd_weight, preset.dmd_weight),
        dmd_reference_elements=pick(cfg.dmd_reference_elements, preset.dmd_reference_elements),
        p_G=preset.p_G if cfg.p_g_mean is None else LogNormal(cfg.p_g_mean, 1.6),
        p_D=preset.p_D,
        tangent_method=cfg.tangent_method,
        max_rollout_steps=pick(cfg.max_rollout_steps, preset.max_rollout_steps),
        dmd_fix_timesteps=rollout_times(cfg) == "mid-times",
        backward_timesteps=mid_times(cfg),
    )
    lr_scale = LORA_LR_SCALE if cfg.lora_rank > 0 else 1.0
    optim = replace(
        preset.optim,
        student_lr=pick(cfg.student_lr, lr_scale * preset.optim.student_lr),
        fake_lr=pick(cfg.fake_lr, lr_scale * preset.optim.fake_lr),
        ema_rate=pick(cfg.ema_rate, preset.optim.ema_rate),
    )
    warmup = 0 if cfg.method == "dmd" else pick(cfg.tangent_warmup, preset.tangent_warmup)
    freq = pick(cfg.student_update_freq, preset.student_update_freq)
    loss = expert_loss(loss, cfg.model, cfg.expert, cfg.guidance)
    return LoopConfig(loss, optim, warmup, freq, cfg.seed, max_bad_steps=cfg.max_bad_steps)


def total_iterations(cfg: DistillConfig) -> int:
    """The run's length: the stages' sum, --iterations, or the preset's when unset."""
    if cfg.stages is not None:
        return stages_total(parse_stages(cfg.stages))
    return get_preset(cfg.model).iterations if cfg.iterations is None else cfg.iterations


def run_stages(cfg: DistillConfig) -> tuple[tuple[Stage, ...], tuple[LoopConfig, ...]]:
    """The run's stages and each one's loop settings: --stages, or one stage of --method for the whole run."""
    if cfg.stages is None:
        return (Stage(cfg.method, total_iterations(cfg)),), (loop_config(cfg),)
    stages = parse_stages(cfg.stages)
    return stages, tuple(loop_config(replace(cfg, method=s.method, stages=None)) for s in stages)


def mid_times(cfg: DistillConfig) -> tuple[float, ...]:
    """The run's sampler mid times: --mid-times, or the preset's."""
    return cfg.mid_times or get_preset(cfg.model).mid_times


def rollout_times(cfg: DistillConfig) -> RolloutTimes:
    """The run's rollout times: --rollout-times, or the preset's."""
    return cfg.rollout_times or get_preset(cfg.model).rollout_times


def lora_config(cfg) -> LoraConfig:
    """The run's adapters (rank 0: none)."""
    return LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_full)


def fingerprint(cfg: DistillConfig) -> dict:
    """The settings a checkpoint must share with the run that resumes it (not the run length, nor how
    the teacher is checked or the student exported: those change no trained value)."""
    skip = {"output", "iterations", "save_every", "log_every", "resume", "overwrite", "progress", "compile"}
    skip |= {"max_bad_steps"}
    skip |= {"mid_times"} if rollout_times(cfg) == "drawn" else set()  # else the rollouts step through them
    unset = ("rollout_times", "max_rollout_steps", "ema_rate")
    skip |= {name for name in unset if getattr(cfg, name) is None}  # older runs resume
    skip |= {"lora_rank", "lora_alpha", "lora_targets"} if cfg.lora_rank == 0 else set()  # older runs resume
    skip |= set() if cfg.lora_full else {"lora_full"}
    skip |= {"image_fraction"}  # recorded below as the resolved share, where there is one (older runs resume)
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    if fraction := image_fraction_of(cfg):
        settings["image_fraction"] = fraction
    if "distributed" in settings:
        skip_distributed = {"strict", "export_layouts"}
        settings["distributed"] = {k: v for k, v in settings["distributed"].items() if k not in skip_distributed}
    return json.loads(json.dumps(settings, default=str))
