"""Settings of the sharded distillation path (`--model` other than toy); see entrypoints/distributed.py."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


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
    """key layouts of that export: official -> student_ema.safetensors, another -> student_ema.<layout>.safetensors"""

    def __post_init__(self):
        if self.batch_size < 1 or self.keep_checkpoints < 1:
            raise ValueError(
                f"batch_size and keep_checkpoints must be >= 1; got {self.batch_size}, {self.keep_checkpoints}"
            )


def export_name(layout: str) -> str:
    """File name of the EMA student's export in a key layout (the official one keeps the plain name)."""
    return "student_ema.safetensors" if layout == "official" else f"student_ema.{layout}.safetensors"
