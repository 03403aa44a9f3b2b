"""`torch.library` registration of attention with a fused forward-mode (JVP) rule.

Four custom ops under the `rcmfn` namespace, each with a fake impl so Dynamo and AOTAutograd treat
them as opaque (no graph breaks under `torch.compile(fullgraph=True)`):

- `rcmfn::attention(q, k, v, scale, impl) -> o` is the entry point. Its Autograd kernel is the
  forward-AD rule: when an input carries a forward-mode tangent (`torch.func.jvp` or
  `torch.autograd.forward_ad`), it unpacks the duals, calls the fused op and returns
  `make_dual(o, t_o)`; otherwise, when a gradient is wanted, it calls `attention_fwd`, whose
  `register_autograd` gives reverse mode, and without one plain SDPA (no log-sum-exp to keep).
  This is deliberately not `autograd.Function.jvp`: under `torch.compile`, Dynamo drops that rule
  inside `torch.func.jvp` and returns wrong tangents without an error (pytorch#192985; guarded by
  tests/ops/test_attention.py::test_compiled_jvp_matches_eager and
  ::test_model_under_compiled_jvp_matches_eager).
- `rcmfn::attention_fwd(q, k, v, scale) -> (o, lse)`: the primal forward. On CUDA it runs the fused
  SDPA backend that `F.scaled_dot_product_attention` would choose (flash, memory-efficient or cuDNN),
  so it is exactly as fast; on CPU it runs the plain-PyTorch reference.
- `rcmfn::attention_bwd(do, q, k, v, o, lse, scale) -> (dq, dk, dv)`: the primal backward, through
  the same SDPA backend's backward (reference formulas on CPU).
- `rcmfn::attention_fwd_jvp(q, k, v, tq, tk, tv, scale, impl) -> (o, t_o, lse)`: the fused forward +
  tangent (SPEC-rcm §9), Triton on CUDA: `hopper.py` (Gluon, warp-specialised) on sm_90 for bf16 and
  fp16 at head dims 64 and 128 in the models' layouts with at least `hopper.min_keys` keys,
  `kernel.py` otherwise. Reverse mode flows through `o` only; `t_o` is non-differentiable (tangents
  are targets, SPEC-rcm §8.2).

`impl` selects the fused kernel: "auto" (Triton on CUDA, reference on CPU), "triton" (the Triton
kernel on any device; on CPU it needs `TRITON_INTERPRET=1` set before triton is first imported, which
is how CI runs the real kernel), "reference" (plain PyTorch, any device).
"""

import functools
import math
from typing import Literal

import torch
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend

from ops.attention import reference

Impl = Literal["auto", "triton", "reference"]
IMPLS = ("auto", "triton", "reference")
NAMESPACE = "rcmfn"

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


# --------------------------------------------------------------------------------------------
# Primal forward and backward: SDPA's own fused backends on CUDA, the reference on CPU.
# --------------------------------------------------------------------------------------------


def _sdpa_backend(q, k, v, scale: float) -> SDPBackend:
    """The SDPA backend `F.scaled_dot_product_attention` would pick for these (B, H, S, D) views."""
    return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale))


@functools.lru_cache(maxsize=64)
def _backend_lse_shape(backend, q_shape, kv_shape, dtype, scale) -> torch.Size:
    """Shape of the LSE a backend returns for (B, H, S, D) inputs (it pads or adds a trailing 1)."""
    qt, kt = (torch.empty(s, device="meta", dtype=dtype) for s in (q_shape, kv_shape))
    if backend == SDPBackend.EFFICIENT_ATTENTION:
        return torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, kt, None, True, scale=scale)[1].shape
    return torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, kt, None, True, scale=scale)[1].shape


def _empty_rng(device) -> torch.Tensor:
    # Dropout is 0, so the backends never read their philox state; they only need a tensor.
    return torch.empty((), dtype=torch.int64, device=device)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if it is contiguous (B, S, H, D) starting on a 16-byte boundary, else a dense copy.

    The fused backends (the one SDPA would pick, cuDNN included) are called below SDPA's own checks,
    so they get the one layout the models produce. Seen on an H200 (torch 2.11): public SDPA's cuDNN
    backward faulted with "misaligned address" when its incoming gradient was a view at an odd offset
    (a slice of a wider head dim), which also broke the CUDA context for everything after it."""
    if x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _cuda_forward(q, k, v, scale: float):
    qt, kt, vt = (_dense(x).transpose(1, 2) for x in (q, k, v))
    backend = _sdpa_backend(qt, kt, vt, scale)
    batch, seq_q, heads, _ = q.shape
    if backend == SDPBackend.FLASH_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, scale=scale)[:2]
    elif backend == SDPBackend.EFFICIENT_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, scale=scale)[:2]
    elif backend == SDPBackend.CUDNN_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, scale=scale)[:2]
    else:  # SDPA itself would run its math path: so do we.
        return reference.attention_forward_reference(q, k, v, scale)
    # lse comes back as (B, H, Sq), (B, H, Sq, 1) or padded to (B, H, 32*ceil(Sq/32)): normalise it.
    lse = lse.reshape(batch, heads, -1)[:, :, :seq_q].float().contiguous()
    return out.transpose(1, 2).contiguous(), lse


def _cuda_backward(grad_out, q, k, v, out, lse, scale: float):
    qt, kt, vt, ot, dot = (_dense(x).transpose(1, 2) for x in (q, k, v, out, grad_out))
    backend = _sdpa_backend(qt, kt, vt, scale)
    seq_q, seq_kv = q.shape[1], k.shape[1]
    rng = _empty_rng(q.device)
    if backend == SDPBackend.FLASH_ATTENTION:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dot, qt, kt, vt, ot, lse, None, None, seq_q, seq_kv, 0.0, False, rng, rng, scale=scale
        )
    elif backend == SDPBackend.EFFICIENT_ATTENTION:
        padded = _backend_lse_shape(backend, tuple(qt.shape), tuple(kt.shape), q.dtype, scale)
        lse_backend = lse.new_zeros(padded)
        lse_backend[:, :, :seq_q] = lse
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dot,
            qt,
            kt,
            vt,
            None,
            ot,
            lse_backend,
            rng,
            rng,
            0.0,
            [True, True, True, False],
            False,
            scale=scale,
        )[:3]
    elif backend == SDPBackend.CUDNN_ATTENTION:
        shape = _backend_lse_shape(backend, tuple(qt.shape), tuple(kt.shape), q.dtype, scale)
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dot,
            qt,
            kt,
            vt,
            ot,
            lse.reshape(shape),
            rng,
            rng,
            None,
            None,
            None,
            seq_q,
            seq_kv,
            0.0,
            False,
            scale=scale,
        )
    else:
        return reference.attention_backward_reference(grad_out, q, k, v, out, lse, scale)
    return tuple(g.transpose(1, 2).contiguous() for g in grads)


@torch.library.custom_op(f"{NAMESPACE}::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output O (B, Sq, H, D) and LSE (B, H, Sq, float32) of softmax(c Q K^T) V.

    SPEC-rcm §9.1. CUDA: the SDPA backend F.scaled_dot_product_attention would choose.
    """
    if q.is_cuda:
        return _cuda_forward(q, k, v, scale)
    return reference.attention_forward_reference(q, k, v, scale)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale):
    batch, seq_q, heads, _ = q.shape
    out = q.new_empty(batch, seq_q, heads, v.shape[-1])
    return out, q.new_empty(batch, heads, seq_q, dtype=reference.lse_dtype(q.dtype))


@torch.library.custom_op(f"{NAMESPACE}::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dQ, dK, dV) of attention given dO, the saved output O and its LSE.

    FlashAttention-2 backward (Dao 2023, Alg. 2). CUDA: the SDPA backend's own backward.
    """
    if q.is_cuda:
        return _cuda_backward(grad_out, q, k, v, out, lse, scale)
    return reference.attention_backward_reference(grad_out, q, k, v, out, lse, scale)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, scale):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
    )


def _setup_primal(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output[0], output[-1]
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = inputs[3] if len(inputs) == 4 else inputs[6]
    ctx.mark_non_differentiable(*output[1:])


def _backward_primal(ctx, grad_out, *unused_grads):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    grads = attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    return (*grads, None, None, None, None, None)


attention_fwd.register_autograd(lambda ctx, *g: _backward_primal(ctx, *g)[:4], setup_context=_setup_primal)


# --------------------------------------------------------------------------------------------
# Fused forward + tangent.
# --------------------------------------------------------------------------------------------


def _use_triton(impl: str, x: torch.Tensor) -> bool:
    """Whether the fused op runs the Triton kernel: "auto" takes it on CUDA for half and float32."""
    if impl == "auto":
        return x.is_cuda and x.dtype != torch.float64
    return impl == "triton"


@torch.library.custom_op(f"{NAMESPACE}::attention_fwd_jvp", mutates_args=())
def attention_fwd_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    scale: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output O, its tangent t_O along (tq, tk, tv), and LSE, in one pass over the keys.

    SPEC-rcm §9.1 (streaming form): t_O = P tV + (P * dS) V - mu O, dS = c (tQ K^T + Q tK^T).
    tk and tv are both None when keys and values carry no tangent (cross-attention to a text):
    the kernel then skips the two matmuls that would multiply zeros (four per tile pair, not six).
    """
    if (tk is None) != (tv is None):
        raise ValueError("tk and tv must both be tensors or both be None")
    if _use_triton(impl, q):
        # Triton is imported on first use, never at import time.
        from ops.attention import hopper, kernel

        if hopper.preferred(q, k, v, tq, tk, tv):
            return hopper.attention_fwd_jvp_hopper(q, k, v, tq, tk, tv, scale)
        return kernel.attention_fwd_jvp(q, k, v, tq, tk, tv, scale)
    return reference.attention_jvp_reference(q, k, v, tq, tk, tv, scale)


@attention_fwd_jvp.register_fake
def _attention_fwd_jvp_fake(q, k, v, tq, tk, tv, scale, impl):
    batch, seq_q, heads, _ = q.shape
    out_shape = (batch, seq_q, heads, v.shape[-1])
    lse = q.new_empty(batch, heads, seq_q, dtype=reference.lse_dtype(q.dtype))
    return q.new_empty(out_shape), q.new_empty(out_shape), lse


attention_fwd_jvp.register_autograd(_backward_primal, setup_context=_setup_primal)


# --------------------------------------------------------------------------------------------
# Entry op: forward-AD rule on its Autograd kernel, reverse mode through attention_fwd.
# --------------------------------------------------------------------------------------------

_lib.define("attention(Tensor q, Tensor k, Tensor v, float scale, str impl) -> Tensor")


def _attention_no_grad(q, k, v, scale):
    """The primal output alone: SDPA's default kernel on CUDA (no log-sum-exp, which only the backward
    needs and whose backends are slower on some shapes, e.g. 1.9x on Sq != Skv), the reference on CPU."""
    if not q.is_cuda:
        return reference.attention_forward_reference(q, k, v, scale)[0]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    return out.transpose(1, 2).contiguous()  # the fake impl promises contiguous (B, Sq, H, D)


def _attention_below_autograd(q, k, v, scale, impl):
    return _attention_no_grad(q, k, v, scale)


# Forward AD has a single dual level in PyTorch (nesting is functorch's business, through its own
# levels on top of dual level 0). The level is passed explicitly because under torch.compile the
# Python-side `forward_ad._current_level` is not set while AOTAutograd retraces the graph, and the
# default level would hide the tangents.
_DUAL_LEVEL = 0


def _attention_autograd(q, k, v, scale, impl):
    duals = [forward_ad.unpack_dual(x, level=_DUAL_LEVEL) for x in (q, k, v)]
    if all(d.tangent is None for d in duals):
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            return torch.ops.rcmfn.attention_fwd(q, k, v, scale)[0]
        return _attention_no_grad(q, k, v, scale)
    primals = [d.primal for d in duals]
    tangents = [torch.zeros_like(d.primal) if d.tangent is None else d.tangent.detach() for d in duals]
    if duals[1].tangent is None and duals[2].tangent is None:
        tangents[1:] = [None, None]  # keys and values without a tangent: the cheaper kernel variant
    out, tangent_out, _ = torch.ops.rcmfn.attention_fwd_jvp(*primals, *tangents, scale, impl)
    return forward_ad.make_dual(out, tangent_out, level=_DUAL_LEVEL)


_lib.impl("attention", _attention_below_autograd, "CompositeExplicitAutograd")
_lib.impl("attention", _attention_autograd, "Autograd")


@torch.library.register_fake(f"{NAMESPACE}::attention", lib=_lib)
def _attention_fake(q, k, v, scale, impl):
    batch, seq_q, heads, _ = q.shape
    return q.new_empty(batch, seq_q, heads, v.shape[-1])


# --------------------------------------------------------------------------------------------
# Public function.
# --------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, S, H, D), got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Softmax attention softmax(scale Q K^T) V over (B, S, H, D) tensors, no mask.

    SPEC-rcm §9.1. q: (B, Sq, H, D); k, v: (B, Skv, H, D); scale defaults to 1/sqrt(D). Works under
    reverse-mode autograd, torch.func.jvp, torch.autograd.forward_ad and torch.compile; the tangent
    comes from the fused kernel selected by `impl` (see the module docstring) and is detached.
    """
    _check_inputs(q, k, v, impl)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not scale > 0:
        raise ValueError(f"scale must be positive (the kernel folds it into exp2), got {scale}")
    return torch.ops.rcmfn.attention(q, k, v, float(scale), impl)
