"""`entrypoints.sample` for a two-expert model (`ModelSpec.experts`, Wan2.2 A14B): both networks of the
student and of the teacher, each sampler switching networks at the boundary (rcmfn/switch.py).

The student is `--checkpoint <root>` holding one folder (or .safetensors file) per expert in `--layout`
(rcmfn/models/experts.py: official high_noise_model / low_noise_model, diffusers transformer / transformer_2,
ours high / low), e.g. the two per-expert distillation runs' exports linked as
`<root>/high_noise_model.safetensors` and `<root>/low_noise_model.safetensors`; the teacher is the release
folder itself (`--teacher Wan2.2-T2V-A14B`, or the -Diffusers one with `--layout diffusers`).
"""

from collections.abc import Callable
from pathlib import Path

from rcmfn.models.experts import expert_checkpoint
from rcmfn.models.family import ModelSpec
from rcmfn.precond import Denoiser
from rcmfn.switch import EXPERTS, ExpertSwitch, split_rf_grid, switched_denoiser, switched_teacher_euler_sample


def load_expert_pair(spec: ModelSpec, root: Path, layout: str, load: Callable) -> dict[str, tuple[Denoiser, dict]]:
    """{"high": (denoise, params), "low": ...} with `load(spec, path) -> (denoise, params)` per expert."""
    if not root.is_dir():
        raise ValueError(f"{root}: a two-expert model's checkpoint is a folder holding one entry per expert")
    return {expert: load(spec, expert_checkpoint(root, layout, expert)) for expert in EXPERTS}


def switched_student(pair: dict, switch: ExpertSwitch) -> tuple[Denoiser, dict]:
    """The pair as one denoiser over {"high": params, "low": params} for rcmfn.samplers.consistency_sample:
    each step runs the expert of its start time, as the released rCM Wan2.2 sampler."""
    denoise = switched_denoiser(pair["high"][0], pair["low"][0], switch)
    return denoise, {expert: pair[expert][1] for expert in EXPERTS}


def teacher_row(pair: dict, switch: ExpertSwitch, rf, uncond, guidance: float | None):
    """(row name, network calls per sample, fn(noise [S, b, ...], cond)) of the switched teacher's Euler
    sampler; `guidance` (--guidance) replaces both experts' own weights when given. CFG doubles the calls
    of the steps of each expert whose weight is above 1."""
    if guidance is not None:
        switch = ExpertSwitch(switch.boundary, guidance, guidance)
    high, low = split_rf_grid(rf, switch)
    nfe = sum((g.shape[0] - 1) * (2 if switch.guidance(e) > 1.0 else 1) for e, g in (("high", high), ("low", low)))
    name = f"teacher Euler {rf.shape[0] - 1} (cfg {switch.guidance_high:g}/{switch.guidance_low:g})"

    def sample(n, c):
        return switched_teacher_euler_sample(pair, switch, n[0], rf, c, uncond.to(c).expand_as(c))

    return name, nfe, sample
