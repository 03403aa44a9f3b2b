"""Checkpoints of a two-expert model (`ModelSpec.experts`, Wan2.2 A14B): one folder per expert.

Release layouts, by key layout name:
- official: `<root>/high_noise_model/` and `<root>/low_noise_model/` (Wan-Video/Wan2.2
  wan/configs/wan_t2v_A14B.py `high_noise_checkpoint` / `low_noise_checkpoint`, loaded by
  `WanModel.from_pretrained(checkpoint_dir, subfolder=...)` in wan/text2video.py);
- diffusers: `<root>/transformer/` (high noise) and `<root>/transformer_2/` (low noise) (diffusers WanPipeline:
  `transformer` runs for t >= boundary_ratio * num_train_timesteps, `transformer_2` below, pipeline_wan.py:116-124);
- ours: `<root>/high/` and `<root>/low/`.
Each folder is whatever rcmfn.models.checkpoint reads (a sharded safetensors folder with its index, or one
file); a `<root>/<folder>.safetensors` file is accepted in place of the folder.
"""

import os
from pathlib import Path

import torch
from torch import nn

from rcmfn.models.checkpoint import LoadReport, export_checkpoint
from rcmfn.models.family import ModelSpec
from rcmfn.switch import EXPERTS

EXPERT_FOLDERS: dict[str, dict[str, str]] = {
    "official": {"high": "high_noise_model", "low": "low_noise_model"},
    "diffusers": {"high": "transformer", "low": "transformer_2"},
    "ours": {"high": "high", "low": "low"},
}
EXPORT_FILES = {"official": "diffusion_pytorch_model.safetensors", "diffusers": "diffusion_pytorch_model.safetensors"}


def check_two_experts(spec: ModelSpec) -> None:
    if spec.experts is None:
        raise ValueError("this model has one network, not two experts (ModelSpec.experts is None)")


def expert_checkpoint(root: str | os.PathLike, layout: str, expert: str) -> Path:
    """The checkpoint of `expert` ("high" / "low") under `root` in `layout`; a clear error if absent."""
    if layout not in EXPERT_FOLDERS:
        raise ValueError(f"no two-expert folder layout {layout!r}; valid: {sorted(EXPERT_FOLDERS)}")
    if expert not in EXPERTS:
        raise ValueError(f"unknown expert {expert!r}; valid: {EXPERTS}")
    root = Path(root)
    folder = EXPERT_FOLDERS[layout][expert]
    for candidate in (root / folder, root / f"{folder}.safetensors"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{root}: no {expert}-noise expert; a two-expert checkpoint in layout {layout!r} holds "
        f"{' and '.join(EXPERT_FOLDERS[layout].values())} (folders or .safetensors files)"
    )


def build_experts(
    spec: ModelSpec,
    root: str | os.PathLike,
    layout: str = "official",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    seed: int = 0,
    **options,
) -> dict[str, tuple[nn.Module, LoadReport]]:
    """{"high": (module, report), "low": (...)}: both experts of `spec` from `root`, each streamed into a
    meta-built module and checked key by key (registry.build_model); a mismatch names the expert."""
    from rcmfn.models.registry import build_model  # the registry imports this module's users, not this

    check_two_experts(spec)
    out = {}
    for expert in EXPERTS:
        path = expert_checkpoint(root, layout, expert)
        try:
            out[expert] = build_model(spec, path, layout, dtype, device, strict, seed, **options)
        except ValueError as error:
            raise type(error)(f"{expert}-noise expert: {error}") from error
    return out


def export_experts(params: dict, root: str | os.PathLike, layout: str, spec: ModelSpec) -> dict[str, Path]:
    """Write {"high": our-named tensors, "low": ...} under `root` in `layout` (one .safetensors per expert
    folder, as the releases name it), each atomically; returns the files written."""
    check_two_experts(spec)
    if layout not in EXPERT_FOLDERS or layout not in spec.key_maps:
        raise ValueError(f"cannot export two experts in layout {layout!r}; valid: {sorted(EXPERT_FOLDERS)}")
    written = {}
    for expert in EXPERTS:
        if expert not in params:
            raise KeyError(f"no {expert}-noise expert weights to export; have {sorted(params)}")
        folder = Path(root) / EXPERT_FOLDERS[layout][expert]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / EXPORT_FILES.get(layout, "model.safetensors")
        export_checkpoint(params[expert], path, spec.key_maps[layout])
        written[expert] = path
    return written
