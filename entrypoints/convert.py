"""`python -m entrypoints.convert`: a registry network's checkpoint from one key layout to another.

The input (.safetensors, a sharded safetensors folder, or .pt / .pth as releases ship) streams into a
network built on the meta device. Every name and shape is checked before any data is read: strict
unless --no-strict, which reports the mismatches and fresh-initialises what the file lacks. The output
is one .safetensors file in the target layout, written atomically. Example: an official Cosmos
release, or an official rCM student, to diffusers' names:
`python -m entrypoints.convert --model cosmos2b --input model.pt --output model.diffusers.safetensors`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from entrypoints.run_folder import is_training_checkpoint, training_weights
from rcmfn.models.checkpoint import LoadReport, export_checkpoint
from rcmfn.models.registry import MODELS, ModelSpec, build_model, get_spec

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
    """.safetensors file to write (never the input)"""
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


def convert(cfg: ConvertConfig, spec: ModelSpec | None = None) -> LoadReport:
    """Read cfg.input in its layout and write cfg.output in the target layout; returns the load report.
    `spec` overrides the registry entry (tests pass tiny configs)."""
    spec = spec or get_spec(cfg.model)
    for flag, layout in (("--source-layout", cfg.source_layout), ("--target-layout", cfg.target_layout)):
        if layout not in spec.key_maps:
            raise ValueError(f"{flag}: unknown key layout {layout!r} for {cfg.model}; valid: {sorted(spec.key_maps)}")
    if not cfg.input.exists():
        raise FileNotFoundError(f"--input {cfg.input} not found")
    if cfg.output.suffix != ".safetensors":
        raise ValueError(f"--output must end in .safetensors; got {cfg.output}")
    if cfg.output.resolve() == cfg.input.resolve():
        raise ValueError(f"--output {cfg.output} is the input: write the conversion to another file")
    source, layout = cfg.input, cfg.source_layout
    if is_training_checkpoint(cfg.input):  # written in our key names whatever --source-layout says
        source, layout = training_weights(cfg.input, cfg.weights), "ours"
    module, report = build_model(spec, source, layout, DTYPES[cfg.dtype], strict=cfg.strict)
    export_checkpoint(module.state_dict(), cfg.output, spec.key_maps[cfg.target_layout])
    return report


def main() -> None:
    cfg = tyro.cli(ConvertConfig, description=__doc__.splitlines()[0] + f" Models: {', '.join(MODELS)}.")
    report = convert(cfg)
    print(report.describe())
    print(f"wrote {cfg.output} ({cfg.target_layout} layout)")


if __name__ == "__main__":
    main()
