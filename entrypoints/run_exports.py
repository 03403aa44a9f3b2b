"""What a distillation run leaves for users: the EMA student in each requested layout (a safetensors file per
key layout, or a diffusers model folder with its card), and for a LoRA run its adapter set beside the merge."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from entrypoints.config import loop_config, mid_times
from entrypoints.presets import get_preset
from entrypoints.sharded_networks import teacher_weights
from rcmfn.atomic import write_atomically
from rcmfn.few_step import FewStepSettings
from rcmfn.lora import LoraConfig, merge
from rcmfn.models.checkpoint import export_checkpoint
from rcmfn.models.diffusers_folder import write_diffusers_folder
from rcmfn.models.family import ModelSpec
from rcmfn.models.model_card import model_card

DIFFUSERS_FOLDER = "diffusers-folder"
"""The export that is a diffusers model folder (rcmfn/models/diffusers_folder.py), not a key layout."""
LORA_EXPORT = "student_ema.lora.safetensors"
"""A LoRA run's EMA adapter set (rcmfn/lora.py convention, the model's own weight keys), beside the merged export."""


def export_name(layout: str) -> str:
    """File name of the EMA student's export in a key layout (the official one keeps the plain name), or
    the folder name of the diffusers-folder export."""
    if layout == DIFFUSERS_FOLDER:
        return "student_ema.diffusers"
    return "student_ema.safetensors" if layout == "official" else f"student_ema.{layout}.safetensors"


def write_exports(cfg, spec: ModelSpec, ema: dict, lora: LoraConfig, layouts: tuple[str, ...]) -> None:
    """The EMA student (`ema`: full weights, or a LoRA run's float32 adapters) in every layout of `layouts`."""
    if lora.enabled:  # the adapters as trained, then the teacher's weights merged with them
        write_atomically(cfg.output / LORA_EXPORT, lambda tmp: save_file(ema, tmp))
        ema = {k: v.to(torch.bfloat16) for k, v in merge(teacher_weights(cfg, spec), ema, lora.alpha).items()}
    for layout in layouts:
        path: Path = cfg.output / export_name(layout)
        if layout == DIFFUSERS_FOLDER:
            # The card names the preset's sampler (--mid-times if given) and the guidance distilled.
            preset = get_preset(cfg.model)
            few_step = FewStepSettings(preset.sigma_max, mid_times(cfg))
            write_diffusers_folder(
                spec, ema, path, model_card(cfg.model, spec, few_step, loop_config(cfg).loss.guidance)
            )
        else:
            export_checkpoint(ema, path, spec.key_maps[layout])
