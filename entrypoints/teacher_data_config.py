"""Settings of `python -m entrypoints.prepare --from-teacher` (entrypoints/teacher_data.py runs it): the
flags, the checks that need no file, and the sampler settings they resolve to."""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from entrypoints.presets import MODELS as PRESETS
from rcmfn.models.registry import get_spec
from rcmfn.precond import check_guidance

TEACHER_SHIFT = 5.0  # the model's default shift (SPEC-rcm §6.2; entrypoints.sample's teacher rows)


@dataclass(frozen=True)
class TeacherDataConfig:
    """--from-teacher: latents sampled by the teacher, one per prompt of --prompt-file (SPEC-rcm §11.1). The
    official synthetic dataset used --steps 100 --shift 3 --guidance 5 --sigma-max 5000 (SPEC-rcm §6.2)."""

    from_teacher: bool = False
    """write shards of teacher samples instead of encoded media (entrypoints/teacher_data.py)"""
    teacher: Path | None = None
    """teacher checkpoint (.safetensors, sharded folder, .pt) in --teacher-layout"""
    teacher_model: str | None = None
    """network of --teacher if not that of --model (e.g. wan14b for wan1.3b data, as the official 1.3B run);
    the data keep the size of --model (the official data: 21 latent frames, of which the 1.3B uses 20)"""
    teacher_layout: str = "official"
    """key layout of --teacher (a key of the model's key maps, e.g. official, diffusers)"""
    teacher_dtype: Literal["bfloat16", "float32", "float64"] = "bfloat16"
    """teacher weights dtype (the release's float32 tables stay float32)"""
    random_teacher: bool = False
    """random teacher weights instead of --teacher, seeded by --seed (throughput benchmarks only)"""
    prompt_file: Path | None = None
    """one prompt per non-empty line; prompt i (its place among those lines) uses noise seeded by (--seed, i)"""
    steps: int = 50
    """teacher Euler steps"""
    guidance: float | None = None
    """teacher CFG weight w >= 1 (standard form F_u + w (F_c - F_u); applied only when w > 1; default: the
    model preset's)"""
    shift: float | None = None
    """time shift of the teacher's Euler grid (default: the model preset's, 5.0 but Wan2.2's 12.0; as sample)"""
    sigma_max: float | None = None
    """start noise level of the teacher's grid (default: the model preset's, as entrypoints.sample)"""
    batch: int = 1
    """prompts per teacher call; batches never cross a shard (another batch changes samples by rounding only)"""
    overwrite: bool = False
    """delete samples written with other settings in --output and start afresh (same settings: resumed)"""

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1; got {self.steps}, {self.batch}")
        if self.guidance is not None:
            check_guidance(self.guidance, "--guidance")
        for name in ("shift", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0 (leave it unset for the default); got {value}")


def check_teacher_flags(cfg) -> None:
    """PrepareConfig's flags that only --from-teacher takes, or that it cannot take, named when misused."""
    t = cfg.teacher_data
    if not t.from_teacher:
        if t.teacher is not None or t.prompt_file is not None or t.random_teacher:
            raise ValueError("--teacher, --random-teacher and --prompt-file need --from-teacher")
        return
    if cfg.model == "toy" or cfg.input is not None:
        raise ValueError("--from-teacher samples a real model's teacher on --prompt-file: no --model toy, no --input")
    if (t.teacher is None) == (not t.random_teacher):
        raise ValueError("--from-teacher needs exactly one of --teacher <checkpoint> and --random-teacher")
    if t.teacher_model is not None:
        data, teacher = get_spec(cfg.model), get_spec(t.teacher_model)
        if (data.family, data.text_len, data.text_dim) != (teacher.family, teacher.text_len, teacher.text_dim):
            raise ValueError(f"--teacher-model {t.teacher_model} does not take {cfg.model}'s inputs (family, text)")


def sampler_settings(cfg) -> tuple[float, float, float]:
    """(guidance, shift, sigma_max): the flags, else the model preset's, as entrypoints.sample resolves them."""
    t, preset = cfg.teacher_data, PRESETS.get(cfg.model)
    guidance = t.guidance if t.guidance is not None else (preset.guidance if preset else 5.0)
    sigma_max = t.sigma_max if t.sigma_max is not None else (preset.sigma_max if preset else 80.0)
    shift = t.shift if t.shift is not None else (preset.teacher_shift if preset else TEACHER_SHIFT)
    return guidance, shift, sigma_max
