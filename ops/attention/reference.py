"""Plain PyTorch attention: the float64 reference for tests and the CPU path of `ops.attention`."""

import math

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Softmax attention in the (B, S, H, D) layout, computed with an explicit S x S score matrix.

    Differentiable in every mode (reverse, torch.func.jvp, forward_ad) because it is built from
    ordinary aten ops; O(Sq * Skv) memory, so only for small sizes, CPU runs and references.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    probs = torch.softmax(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
