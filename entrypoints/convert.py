"""`python -m entrypoints.convert`: a registry network's checkpoint from one key layout to another.

The input (.safetensors, a sharded safetensors folder, or .pt / .pth as releases ship) streams into a
network built on the meta device. Every name and shape is checked before any data is read: strict
unless --no-strict, which reports the mismatches and fresh-initialises what the file lacks. The output
is one .safetensors file in the target layout, or with --export-format diffusers-folder a folder that
diffusers' `<Transformer>.from_pretrained` loads as it is (config.json, sharded weights, a model card
with the student's sampler settings), written atomically. Example: an official Cosmos
release, or an official rCM student, to diffusers' names:
`python -m entrypoints.convert --model cosmos2b --input model.pt --output model.diffusers.safetensors`.
`--extract-lora R --teacher T` writes instead a rank-R LoRA of the input minus its teacher (truncated SVD
of each targeted weight's difference) in --lora-format, and prints the relative reconstruction errors.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from safetensors.torch import load_file

from entrypoints.presets import MODELS as PRESETS
from entrypoints.run_folder import is_training_checkpoint, training_weights
from rcmfn.few_step import FewStepSettings
from rcmfn.models.checkpoint import LoadReport, export_checkpoint
from rcmfn.models.diffusers_folder import write_diffusers_folder
from rcmfn.models.lora_extract import DEFAULT_TARGETS, extract_lora, relative_errors
from rcmfn.models.lora_formats import check_targets, parse_adapter, write_lora
from rcmfn.models.model_card import model_card
from rcmfn.models.registry import MODELS, ModelSpec, build_model, get_spec
from rcmfn.samplers import PAPER_MID_TIMES

DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ConvertConfig:
    """Convert a checkpoint of a registry network between key layouts (official, diffusers, ...)."""

    model: str
    """network of rcmfn/models/registry.py (wan1.3b, wan14b, cosmos2b, cosmos14b, ...)"""
    input: Path
    """checkpoint to read (.safetensors, sharded folder with its index, .pt / .pth), or a training
    checkpoint folder of entrypoints.distill (either runner; read in this process, in our key names)"""
    output: Path
    """.safetensors file to write (never the input), or the folder of --export-format diffusers-folder"""
    source_layout: str = "official"
    """key layout of the input (official, official-ema for a release's EMA copy, diffusers, ours)"""
    target_layout: str = "diffusers"
    """key layout of the output"""
    dtype: Literal["keep", "bfloat16", "float32"] = "keep"
    """dtype of the written tensors; keep: the input's (float32 tables stay float32 under bfloat16)"""
    strict: bool = True
    """the input must match the network key for key; off: print mismatches, fresh-init what it lacks"""
    weights: Literal["ema", "student", "fake"] = "ema"
    """which network of a training checkpoint folder to convert"""
    export_format: Literal["safetensors", "diffusers-folder"] = "safetensors"
    """safetensors: one file in --target-layout; diffusers-folder: a folder diffusers' from_pretrained loads
    (config.json, weights in shards of --shard-size-gb with their index, README.md with the sampler settings)"""
    shard_size_gb: float = 5.0
    """largest weight shard of a diffusers folder, in GB of 10^9 bytes (diffusers' own default: 5)"""
    extract_lora: int = 0
    """rank R: write a LoRA of the input minus --teacher (truncated SVD per targeted weight) instead; 0: off"""
    teacher: Path | None = None
    """the teacher checkpoint that --extract-lora subtracts"""
    teacher_layout: str = "official"
    """key layout of --teacher"""
    lora_format: Literal["diffusers", "comfyui", "ours"] = "diffusers"
    """layout of the LoRA file: diffusers (peft names, WanPipeline.load_lora_weights), comfyui (LoraLoader),
    ours (rcmfn's K.lora_down / K.lora_up / K.alpha)"""
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    """fnmatch patterns of our weight names that the LoRA adapts (2-D weights only)"""
    lora_input: bool = False
    """--input is an rcmfn LoRA adapter (K.lora_down [rank, in], K.lora_up [out, rank], optional K.alpha, e.g. a
    LoRA student's): rewrite it in --lora-format, checked against the network's names and shapes"""
    lora_alpha: float | None = None
    """alpha of a --lora-input adapter's weights without their own K.alpha (scale alpha / rank); unset: rank"""


def check_config(cfg: ConvertConfig, spec: ModelSpec) -> None:
    """Every error that needs no tensor: layouts, paths, the output's form for the chosen export."""
    layouts = [("--source-layout", cfg.source_layout), ("--target-layout", cfg.target_layout)]
    layouts += [("--teacher-layout", cfg.teacher_layout)] if cfg.extract_lora else []
    for flag, layout in layouts:
        if layout not in spec.key_maps:
            raise ValueError(f"{flag}: unknown key layout {layout!r} for {cfg.model}; valid: {sorted(spec.key_maps)}")
    if not cfg.input.exists():
        raise FileNotFoundError(f"--input {cfg.input} not found")
    if cfg.output.resolve() == cfg.input.resolve():
        raise ValueError(f"--output {cfg.output} is the input: write the conversion to another file")
    folder = cfg.export_format == "diffusers-folder" and not cfg.extract_lora
    if folder:
        spec.diffusers_config()  # names a family without a diffusers class
        if cfg.target_layout != "diffusers":
            raise ValueError(f"--export-format diffusers-folder writes the diffusers layout; got {cfg.target_layout}")
        if cfg.output.suffix == ".safetensors" or cfg.output.is_file():
            raise ValueError(f"--output {cfg.output} must be a folder for --export-format diffusers-folder")
        if cfg.output.is_dir() and any(cfg.output.iterdir()) and not (cfg.output / "config.json").is_file():
            raise ValueError(f"--output {cfg.output} holds files but no diffusers config.json: not replacing it")
        if not cfg.shard_size_gb > 0:
            raise ValueError(f"--shard-size-gb must be > 0; got {cfg.shard_size_gb}")
    elif cfg.output.suffix != ".safetensors":
        raise ValueError(f"--output must end in .safetensors; got {cfg.output}")
    if cfg.extract_lora < 0:
        raise ValueError(f"--extract-lora must be a rank >= 1 (0: off); got {cfg.extract_lora}")
    if cfg.extract_lora and (cfg.teacher is None or not cfg.teacher.exists()):
        raise ValueError(f"--extract-lora needs the student's --teacher checkpoint; got {cfg.teacher}")


def load(cfg: ConvertConfig, spec: ModelSpec, path: Path, layout: str):
    """(module, report) of the network in `path`; a training checkpoint folder is read in our names."""
    if is_training_checkpoint(path):  # written in our key names whatever the layout flag says
        path, layout = training_weights(path, cfg.weights), "ours"
    return build_model(spec, path, layout, DTYPES[cfg.dtype], strict=cfg.strict)


def sampler_settings(model: str) -> tuple[FewStepSettings, float | None]:
    """The student's sampler settings and teacher guidance from the model preset (sample's defaults
    without one: sigma_max 80, the paper's mid times)."""
    if model in PRESETS:
        preset = PRESETS[model]
        return FewStepSettings(preset.sigma_max, preset.mid_times), preset.guidance
    return FewStepSettings(80.0, PAPER_MID_TIMES), None


def convert(cfg: ConvertConfig, spec: ModelSpec | None = None) -> LoadReport:
    """Read cfg.input in its layout and write cfg.output in the target layout (a file, or a diffusers
    folder); returns the load report. `spec` overrides the registry entry (tests pass tiny configs)."""
    spec = spec or get_spec(cfg.model)
    check_config(cfg, spec)
    module, report = load(cfg, spec, cfg.input, cfg.source_layout)
    if cfg.export_format == "diffusers-folder":
        settings, guidance = sampler_settings(cfg.model)
        card = model_card(cfg.model, spec, settings, guidance)
        shard_bytes = max(1, int(cfg.shard_size_gb * 1e9))
        write_diffusers_folder(spec, module.state_dict(), cfg.output, card, shard_bytes)
    else:
        export_checkpoint(module.state_dict(), cfg.output, spec.key_maps[cfg.target_layout])
    return report


def extract(cfg: ConvertConfig, spec: ModelSpec | None = None) -> tuple[LoadReport, dict[str, float]]:
    """Write the rank-R LoRA of cfg.input minus cfg.teacher in cfg.lora_format; returns the student's load
    report and the relative reconstruction error per target group and overall."""
    spec = spec or get_spec(cfg.model)
    check_config(cfg, spec)
    student, report = load(cfg, spec, cfg.input, cfg.source_layout)
    teacher, _ = load(cfg, spec, cfg.teacher, cfg.teacher_layout)
    factors, errors = extract_lora(student.state_dict(), teacher.state_dict(), cfg.extract_lora, cfg.lora_targets)
    write_lora(spec, factors, cfg.output, cfg.lora_format, rank=str(cfg.extract_lora))
    return report, relative_errors(errors)


def convert_lora(cfg: ConvertConfig, spec: ModelSpec | None = None) -> int:
    """Rewrite the rcmfn adapter in cfg.input in cfg.lora_format; returns the number of adapted weights."""
    spec = spec or get_spec(cfg.model)
    if cfg.input.suffix != ".safetensors" or not cfg.input.is_file():
        raise ValueError(f"--lora-input: --input must be an adapter .safetensors file; got {cfg.input}")
    if cfg.output.suffix != ".safetensors" or cfg.output.resolve() == cfg.input.resolve():
        raise ValueError(f"--output must be another .safetensors file; got {cfg.output}")
    targets = parse_adapter(load_file(cfg.input), cfg.lora_alpha)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in spec.build(spec.config).state_dict().items()}
    check_targets(targets, shapes)
    write_lora(spec, targets, cfg.output, cfg.lora_format)
    return len(targets)


def main() -> None:
    cfg = tyro.cli(ConvertConfig, description=__doc__.splitlines()[0] + f" Models: {', '.join(MODELS)}.")
    if cfg.lora_input:
        print(f"wrote {cfg.output}: {convert_lora(cfg)} adapted weights ({cfg.lora_format} LoRA layout)")
        return
    if cfg.extract_lora:
        report, errors = extract(cfg)
        print(report.describe())
        print(f"rank-{cfg.extract_lora} LoRA, relative reconstruction error ||D - D_R||_F / ||D||_F:")
        for group in sorted(set(errors) - {"overall"}) + ["overall"]:
            print(f"  {group}: {errors[group]:.4g}")
        print(f"wrote {cfg.output} ({cfg.lora_format} LoRA layout)")
        return
    report = convert(cfg)
    print(report.describe())
    kind = "diffusers folder" if cfg.export_format == "diffusers-folder" else f"{cfg.target_layout} layout"
    print(f"wrote {cfg.output} ({kind})")


if __name__ == "__main__":
    main()
