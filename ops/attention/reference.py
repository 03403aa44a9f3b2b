"""Plain PyTorch attention: the float64 reference for tests and the CPU path of `ops.attention`.

Everything here works in the (B, S, H, D) layout of `ops.attention` and builds the full
(B, H, Sq, Skv) score matrix, so it is O(Sq * Skv) in memory: for CPU runs, small sizes and tests.
Half-precision inputs are computed in float32 and cast back; float32 and float64 stay as they are.
"""

import math

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the log-sum-exp statistics: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int) -> float:
    """Softmax scale used when none is given: 1 / sqrt(D).

    SPEC-rcm §9.1 (c = d_qk^{-1/2}).
    """
    return 1.0 / math.sqrt(head_dim)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Softmax attention in the (B, S, H, D) layout, computed with an explicit S x S score matrix.

    SPEC-rcm §9.1 (O = softmax(c Q K^T) V). Differentiable in every mode (reverse,
    torch.func.jvp, forward_ad) because it is built from ordinary aten ops.
    """
    if scale is None:
        scale = default_scale(q.shape[-1])
    work = _compute_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(work)).to(q.dtype)


def attention_forward_reference(q, k, v, scale: float):
    """Attention output O (B, Sq, H, D) and log-sum-exp of the scaled scores (B, H, Sq).

    SPEC-rcm §9.1-9.2 (LSE = m + log l, natural log).
    """
    work = _compute_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(work))
    return out.to(q.dtype).contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


def attention_backward_reference(grad_out, q, k, v, out, lse, scale: float):
    """Gradients (dQ, dK, dV) of attention from dO, recomputing P = exp(c Q K^T - LSE).

    FlashAttention-2 backward: dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = c dS K,
    dK = c dS^T Q.
    """
    work = _compute_dtype(q.dtype)
    q_, k_, v_, do_, o_ = (t.to(work) for t in (q, k, v, grad_out, out))
    scores = torch.einsum("bqhd,bkhd->bhqk", q_, k_) * scale
    probs = torch.exp(scores - lse.to(work)[..., None])
    grad_v = torch.einsum("bhqk,bqhd->bkhd", probs, do_)
    grad_p = torch.einsum("bqhd,bkhd->bhqk", do_, v_)
    delta = (do_ * o_).sum(-1).transpose(1, 2)  # (B, H, Sq)
    grad_s = probs * (grad_p - delta[..., None])
    grad_q = torch.einsum("bhqk,bkhd->bqhd", grad_s, k_) * scale
    grad_k = torch.einsum("bhqk,bqhd->bkhd", grad_s, q_) * scale
    return tuple(g.to(q.dtype).contiguous() for g in (grad_q, grad_k, grad_v))


def attention_jvp_reference(q, k, v, tq, tk, tv, scale: float):
    """Output O, its tangent dO along (tq, tk, tv), and LSE, in closed form.

    SPEC-rcm §9.1: dS = c (dQ K^T + Q dK^T), mu = rowsum(P * dS), dO = P dV + (P * dS) V - mu O.
    tk and tv may both be None: keys and values without a tangent (cross-attention to a text).
    """
    work = _compute_dtype(q.dtype)
    q_, k_, v_, tq_ = (t.to(work) for t in (q, k, v, tq))
    scores = torch.einsum("bqhd,bkhd->bhqk", q_, k_) * scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    tscores = torch.einsum("bqhd,bkhd->bhqk", tq_, k_)
    if tk is not None:
        tscores = tscores + torch.einsum("bqhd,bkhd->bhqk", q_, tk.to(work))
    weighted = probs * (tscores * scale)
    mu = weighted.sum(-1)  # (B, H, Sq)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v_)
    tout = torch.einsum("bhqk,bkhd->bqhd", weighted, v_) - mu.transpose(1, 2)[..., None] * out
    if tv is not None:
        tout = tout + torch.einsum("bhqk,bkhd->bqhd", probs, tv.to(work))
    return (
        out.to(q.dtype).contiguous(),
        tout.to(q.dtype).contiguous(),
        lse.to(lse_dtype(q.dtype)).contiguous(),
    )
