"""A LoRA adapter extracted from a full student and its teacher: truncated SVD of each weight difference.

By Eckart-Young the rank-R truncated SVD is the best rank-R approximation of W_student - W_teacher in the
Frobenius norm, and its error is the tail of the singular values, ||D - D_R||_F^2 = sum_{i>R} s_i^2.
The factors are split evenly (up = U_R sqrt(S_R), down = sqrt(S_R) V_R^T, alpha = rank so the scale is 1),
which keeps both of the same magnitude when they are stored in bfloat16. rcmfn/models/lora_formats.py
writes the result in any layout.
"""

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from rcmfn.models.lora_formats import LoraFactors

DEFAULT_TARGETS = ("blocks.*",)
"""fnmatch patterns of our names adapted by default: every 2-D weight inside the transformer blocks."""

_BLOCK = re.compile(r"^(blocks|transformer_blocks)\.\d+\.")


@dataclass(frozen=True)
class ExtractionError:
    """Squared Frobenius norms of one target's difference D and of D minus its rank-R approximation."""

    residual_sq: float
    difference_sq: float


def target_names(params: Mapping[str, Tensor], patterns: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Names of the 2-D `.weight` tensors matching any pattern (norm scales, biases, convolutions excluded)."""
    names = [
        n
        for n, t in params.items()
        if n.endswith(".weight") and t.dim() == 2 and any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]
    if not names:
        raise ValueError(f"no 2-D weight matches the LoRA targets {list(patterns)}")
    return names


def extract_lora(
    student: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor],
    rank: int,
    patterns: tuple[str, ...] = DEFAULT_TARGETS,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, LoraFactors], dict[str, ExtractionError]]:
    """Rank-`rank` factors of student - teacher for every target, and each one's error (float64 SVD).

    Factors come back in `dtype` (default: the student's); the error is measured with those stored factors.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}")
    factors: dict[str, LoraFactors] = {}
    errors: dict[str, ExtractionError] = {}
    for name in target_names(student, patterns):
        if name not in teacher or teacher[name].shape != student[name].shape:
            got = tuple(teacher[name].shape) if name in teacher else "missing"
            raise ValueError(f"teacher weight {name}: {got}; the student's is {tuple(student[name].shape)}")
        difference = student[name].double() - teacher[name].double()
        u, s, vh = torch.linalg.svd(difference, full_matrices=False)
        r = min(rank, s.shape[0])
        root = s[:r].sqrt()
        out = dtype or student[name].dtype
        down, up = (root[:, None] * vh[:r]).to(out).contiguous(), (u[:, :r] * root).to(out).contiguous()
        f = LoraFactors(down=down, up=up, alpha=float(r))
        factors[name] = f
        residual = (difference - f.delta()).square().sum().item()
        errors[name] = ExtractionError(residual, difference.square().sum().item())
    return factors, errors


def target_group(name: str) -> str:
    """The name without its block index (blocks.7.self_attn.q.weight -> self_attn.q.weight)."""
    return _BLOCK.sub("", name)


def relative_errors(errors: Mapping[str, ExtractionError]) -> dict[str, float]:
    """||D - D_R||_F / ||D||_F per target group (summed over blocks) and "overall"; 0 where D = 0."""
    groups: dict[str, list[float]] = {}
    for name, e in errors.items():
        for key in (target_group(name), "overall"):
            acc = groups.setdefault(key, [0.0, 0.0])
            acc[0] += e.residual_sq
            acc[1] += e.difference_sq
    return {k: (math.sqrt(r / d) if d > 0 else 0.0) for k, (r, d) in groups.items()}
