"""Wan2.1 T2V DiT: v = net(x, 1000 r, text), one module whose parameters are passed in.

SPEC-models §3.2-3.4 (architecture), SPEC-rcm §8.1, §8.3, §8.4 (precision, "high-precision time").

Use it through `torch.func.functional_call` (see `velocity_net`): the module only names and shapes the
parameters; build it under `torch.device("meta")` and materialise it with
`rcmfn.models.checkpoint.load_into_meta_module`. Parameter names are the official release names.

Precision, chosen per tensor rather than by autocast (SPEC-models §3.4, official numerics):
- act dtype = the dtype of the block weights (bf16 in training). Patch, text, q/k/v/o and FFN linears
  run in it; attention gets q, k, v in it.
- wide dtype = promote(act, float32): time MLP and projection, modulation, gates, the residual stream,
  LayerNorm/RMSNorm statistics, RoPE and the output head. The output is in the wide dtype.
- the timestep sinusoid in `sinusoid_dtype`: float64 as the official code and rCM ("high-precision
  time"), or float32 as diffusers (the switch the equivalence test uses, SPEC-models §5).

Activation checkpointing and other per-block wrapping are applied from outside (parallel/parallelize.py)
by replacing or wrapping entries of `model.blocks` (a ModuleList of `WanBlock`, each called as
`block(x, e0, context, rope_cos, rope_sin)`).
"""

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops import attention as ops_attention
from rcmfn.lora_linear import linear_weight
from rcmfn.models.wan.configs import WanConfig

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (B, S, H, D) q, k, v -> (B, Sq, H, D)


def timestep_sinusoid(timestep: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """[cos(t f_k), sin(t f_k)], f_k = 10000^(-k/half), k < half = dim/2, in `dtype`. SPEC-models §3.2."""
    half = dim // 2
    # exp(-ln(10000) k / half) is the diffusers form; in float64 it equals the official pow form.
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype, device=timestep.device) / half)
    angles = timestep.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_angles(grid: tuple[int, int, int], cfg: WanConfig, device: torch.device) -> Tensor:
    """Angles (L, d/2), float64, of token (t, h, w) in t-major order. SPEC-models §3.3.

    Axis a with n_a real dims has omega_j = theta^(-2j / n_a); the angle list is [t w_t, h w_h, w w_w].
    """
    per_axis = []
    for size, n_dims in zip(grid, cfg.rope_dims, strict=True):
        omega = cfg.rope_theta ** (-torch.arange(0, n_dims, 2, dtype=torch.float64, device=device) / n_dims)
        per_axis.append(torch.arange(size, dtype=torch.float64, device=device)[:, None] * omega)
    t_ang, h_ang, w_ang = per_axis
    T, H, W = grid
    angles = torch.cat(
        [
            t_ang[:, None, None, :].expand(T, H, W, -1),
            h_ang[None, :, None, :].expand(T, H, W, -1),
            w_ang[None, None, :, :].expand(T, H, W, -1),
        ],
        dim=-1,
    )
    return angles.reshape(T * H * W, -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ADJACENT feature pairs (x_2j, x_2j+1) of x (B, L, H, D) by angles (L, D/2). SPEC §3.3."""
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1).flatten(-2)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight over the last dim, computed and returned in promote(x, float32)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    x = x.to(wide)
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(wide)


def layer_norm(x: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """LayerNorm over the last dim (affine if weight and bias are given), in promote(x, float32)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    # The affine part is applied outside F.layer_norm: an affine F.layer_norm inside a compiled
    # torch.func.jvp hits "INTERNAL ASSERT FAILED ... _fw_primal" in Dynamo's fake-tensor pass (torch
    # 2.13; same assert as pytorch#160508). Guarded by test_wan.py::test_compiled_jvp_matches_eager.
    y = F.layer_norm(x.to(wide), (x.shape[-1],), None, None, eps)
    return y if weight is None else y * weight.to(wide) + bias.to(wide)


def wide_linear(x: Tensor, layer: nn.Linear, dtype: torch.dtype) -> Tensor:
    """A linear layer evaluated in `dtype` whatever its weights are stored in (fp32 "autocast"); a LoRA
    layer with its adapter merged (rcmfn/lora_linear.py)."""
    return F.linear(x.to(dtype), linear_weight(layer).to(dtype), layer.bias.to(dtype))


def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, C, T, H, W) -> (B, L, C pt ph pw): tokens t-major, features in Conv3d order (c, kt, kh, kw)."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """(B, L, pt ph pw C) -> (B, C, T, H, W); feature index ((i_t ph + i_h) pw + i_w) C + c. SPEC §3.2."""
    B = x.shape[0]
    (T, H, W), (pt, ph, pw) = grid, patch
    x = x.reshape(B, T, H, W, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, -1, T * pt, H * ph, W * pw)


class RMSNorm(nn.Module):
    """Holds the weight of a q/k RMSNorm over the full width (all heads together); see `rms_norm`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    """Multi-head attention with RMSNorm'd q, k over the full width (official `WanSelfAttention`)."""

    def __init__(self, cfg: WanConfig, attention_fn: AttentionFn):
        super().__init__()
        dim = cfg.dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)
        self.num_heads, self.eps, self.attention_fn = cfg.num_heads, cfg.eps, attention_fn

    def forward(self, x: Tensor, source: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """x (B, L, D) attends to source (B, S, D), both in the act dtype; RoPE on q, k if given."""
        heads = (self.num_heads, -1)
        q = rms_norm(self.q(x), self.norm_q.weight, self.eps).unflatten(-1, heads)
        k = rms_norm(self.k(source), self.norm_k.weight, self.eps).unflatten(-1, heads)
        v = self.v(source).unflatten(-1, heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.attention_fn(q.to(x.dtype), k.to(x.dtype), v)
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, plain cross-attention, modulated FFN. SPEC §3.2 step 4."""

    def __init__(self, cfg: WanConfig, attention_fn: AttentionFn):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = Attention(cfg, attention_fn)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps)  # the affine cross-attention norm
        self.cross_attn = Attention(cfg, attention_fn)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        """x (B, L, D) residual stream and e0 (B, 6, D) in the wide dtype; context (B, Lc, D) in act."""
        act = context.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.to(x.dtype) + e0).chunk(6, dim=1)
        y = (layer_norm(x, self.eps) * (1 + scale_sa) + shift_sa).to(act)
        x = x + self.self_attn(y, y, (rope_cos, rope_sin)).to(x.dtype) * gate_sa
        y = layer_norm(x, self.eps, self.norm3.weight, self.norm3.bias).to(act)
        x = x + self.cross_attn(y, context, None).to(x.dtype)
        y = (layer_norm(x, self.eps) * (1 + scale_ff) + shift_ff).to(act)
        return x + self.ffn(y).to(x.dtype) * gate_ff


class Head(nn.Module):
    """Output layer: modulated LayerNorm (shift, scale from e, not SiLU(e)) and a linear to patches."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)


class WanModel(nn.Module):
    """Wan2.1 T2V DiT: forward(x [B,16,T,H,W], timestep [B] = 1000 r, context [B,Lc,4096]) -> v.

    SPEC-models §3.2. `attention_fn` defaults to `ops.attention` (B, S, H, D).
    """

    # Parameters the release computes in float32 (time MLP, modulation tables, norms): they stay
    # float32 when a checkpoint is loaded in bf16 (rcmfn.models.checkpoint, `fp32_patterns`).
    fp32_patterns = (
        "time_embedding.*",
        "time_projection.*",
        "*modulation",
        "*.norm_q.*",
        "*.norm_k.*",
        "*.norm3.*",
    )

    def __init__(
        self,
        cfg: WanConfig,
        *,
        sinusoid_dtype: torch.dtype = torch.float64,
        attention_fn: AttentionFn | None = None,
    ):
        super().__init__()
        if sinusoid_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"sinusoid_dtype must be torch.float32 or torch.float64; got {sinusoid_dtype}")
        self.cfg, self.sinusoid_dtype = cfg, sinusoid_dtype
        attention_fn = attention_fn or ops_attention
        dim = cfg.dim
        # A Conv3d with kernel = stride = patch holds the weight in the release shape (D, C, pt, ph, pw);
        # forward applies it as one matmul over flattened patches (same numbers, simpler under jvp).
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg, attention_fn) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def check_inputs(self, x: Tensor, timestep: Tensor, context: Tensor) -> None:
        """Raise ValueError naming the first input whose shape does not fit the config."""
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x must be [B, {cfg.in_dim}, T, H, W]; got {tuple(x.shape)}")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True)):
            raise ValueError(f"x's T, H, W {tuple(x.shape[2:])} must divide by patch_size {cfg.patch_size}")
        if timestep.shape != (x.shape[0],):
            raise ValueError(f"timestep must be [B] = [{x.shape[0]}]; got {tuple(timestep.shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [{x.shape[0]}, Lc, {cfg.text_dim}]; got {tuple(context.shape)}")

    def time_embeddings(self, timestep: Tensor, wide: torch.dtype) -> tuple[Tensor, Tensor]:
        """e (B, D) and e0 (B, 6, D) in the wide dtype. SPEC-models §3.2 step 2, SPEC-rcm §8.4."""
        sinusoid = timestep_sinusoid(timestep, self.cfg.freq_dim, self.sinusoid_dtype).to(wide)
        e = wide_linear(F.silu(wide_linear(sinusoid, self.time_embedding[0], wide)), self.time_embedding[2], wide)
        e0 = wide_linear(F.silu(e), self.time_projection[1], wide)
        return e, e0.unflatten(1, (6, -1))

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        """Velocity v (B, out_dim, T, H, W) in the wide dtype. SPEC-models §3.2."""
        self.check_inputs(x, timestep, context)
        cfg = self.cfg
        act = self.patch_embedding.weight.dtype
        wide = torch.promote_types(act, torch.float32)
        grid = tuple(s // p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True))
        weight = self.patch_embedding.weight.flatten(1)
        h = F.linear(patchify(x.to(act), cfg.patch_size), weight, self.patch_embedding.bias).to(wide)
        e, e0 = self.time_embeddings(timestep, wide)
        c = self.text_embedding(context.to(act))
        angles = rope_angles(grid, cfg, x.device)
        rope_cos, rope_sin = torch.cos(angles).to(wide), torch.sin(angles).to(wide)
        for block in self.blocks:
            h = block(h, e0, c, rope_cos, rope_sin)
        shift, scale = (self.head.modulation.to(wide) + e[:, None, :]).chunk(2, dim=1)
        out = wide_linear(layer_norm(h, cfg.eps) * (1 + scale) + shift, self.head.head, wide)
        return unpatchify(out, grid, cfg.patch_size)


def velocity_net(model: WanModel) -> Callable[[Mapping[str, Tensor], Tensor, Tensor, Tensor], Tensor]:
    """net(params, x, timestep, context) = functional_call(model, params, ...): rcmfn's velocity net."""

    def net(params: Mapping[str, Tensor], x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(params.items()), (x, timestep, context))

    return net
