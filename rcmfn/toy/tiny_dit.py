"""Tiny DiT velocity net for the CPU toy: the student and fake score of the toy distillation.

SPEC-rcm §8.1 in miniature (Wan2.1 layout): patch (1, p, p) embedding (p = 2 as Wan's by default; the
toy's 8 x 8 latent uses p = 4, docs/toy.md "Default run"), sinusoidal time embedding of
c_noise with adaLN shift/scale/gate, self-attention with q/k RMSNorm, cross-attention to the text
tokens, GELU(tanh) MLP, adaLN head and unpatchify. Positions are learned per axis (t, h, w) and summed,
so any T <= max_frames, H/p, W/p <= max_patches works. Attention is `ops.attention` on (B, S, heads, d).

Use: `module = TinyDiT(cfg)`, `params = init_params(module, generator)` (a flat TensorDict keyed by
parameter name), `net = velocity_net(module)`, then `net(params, x_in, c_noise, cond) -> v`. The module's
own parameters are only a template; every call goes through `torch.func.functional_call`, so the same
net works under `torch.func.jvp` and `torch.compile(fullgraph=True)`.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as nnf
from tensordict import TensorDict
from torch import nn

from ops import attention


@dataclass(frozen=True)
class TinyDiTConfig:
    """Sizes of the tiny DiT; defaults fit the 4 x 1 x 8 x 8 toy latent and 8 x 32 text tokens.

    Measured on one (shared) CPU core, batch 64: about 23 ms per warm-start step (forward, backward,
    AdamW), 1500 steps in about 35 s. depth 3 / mlp_ratio 4 reaches about 1.6x lower velocity MSE at the
    same step count for about 1.7x the time per step.
    """

    channels: int = 4
    """latent channels C (input and output)"""
    width: int = 64
    """model width (token dimension)"""
    depth: int = 2
    """number of transformer blocks"""
    heads: int = 4
    """attention heads; width must divide by heads"""
    mlp_ratio: int = 2
    """MLP hidden width = mlp_ratio * width"""
    text_dim: int = 32
    """width D of the condition tokens [B, L, D]"""
    freq_dim: int = 64
    """size of the sinusoidal timestep embedding (even)"""
    max_frames: int = 16
    """largest latent T the learned positions cover"""
    max_patches: int = 32
    """largest H/patch and W/patch the learned positions cover"""
    patch: int = 2
    """spatial patch size (time is not patched): 2 is Wan's (1, 2, 2); H and W must divide by it"""

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"TinyDiTConfig.width={self.width} must be divisible by heads={self.heads}")
        if self.freq_dim % 2:
            raise ValueError(f"TinyDiTConfig.freq_dim must be even; got {self.freq_dim}")
        for name in ("channels", "width", "depth", "heads", "mlp_ratio", "text_dim", "max_frames", "patch"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyDiTConfig.{name} must be >= 1; got {getattr(self, name)}")


def timestep_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(p w_k), sin(p w_k)] with w_k = 10000^(-k / (dim/2)), in float64. SPEC-rcm §8.1, §8.4."""
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=c_noise.device) / half)
    angle = c_noise.double()[:, None] * omega[None, :]
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


class Norm(nn.Module):
    """LayerNorm ("layer") or RMSNorm ("rms") over the last axis, eps 1e-6, optional learned affine.

    The affine is applied after a weightless F.layer_norm / F.rms_norm, not passed into it: under
    torch.compile(fullgraph=True) a torch.func.jvp through the fused affine forms fails with an internal
    assert on aten._fw_primal in fake-tensor tracing (torch 2.13; same family as pytorch#197090). Guarded
    by test_compiled_forward_and_jvp_match_eager; fold the affine back in when that passes without it.
    """

    def __init__(self, width: int, kind: Literal["layer", "rms"], affine: bool):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.empty(width)) if affine else None
        self.bias = nn.Parameter(torch.empty(width)) if affine and kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        y = nnf.layer_norm(x, shape, eps=1e-6) if self.kind == "layer" else nnf.rms_norm(x, shape, eps=1e-6)
        if self.weight is not None:
            y = y * self.weight
        return y if self.bias is None else y + self.bias


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (1 + scale) + shift with per-sample [B, 1, width] shift and scale."""
    return x * (1.0 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention of x's queries over context's keys/values, q/k RMSNorm over the full width."""

    def __init__(self, width: int, heads: int, context_dim: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(context_dim, width)
        self.v = nn.Linear(context_dim, width)
        self.norm_q = Norm(width, "rms", affine=True)
        self.norm_k = Norm(width, "rms", affine=True)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q = self.norm_q(self.q(x)).reshape(b, s, self.heads, w // self.heads)
        k = self.norm_k(self.k(context)).reshape(b, context.shape[1], self.heads, w // self.heads)
        v = self.v(context).reshape(b, context.shape[1], self.heads, w // self.heads)
        return self.out(attention(q, k, v).reshape(b, s, w))


class Block(nn.Module):
    """adaLN-gated self-attention, ungated cross-attention (affine LN), adaLN-gated MLP (Wan block)."""

    def __init__(self, cfg: TinyDiTConfig):
        super().__init__()
        w = cfg.width
        self.norm1 = Norm(w, "layer", affine=False)
        self.self_attn = Attention(w, cfg.heads, w)
        self.norm_cross = Norm(w, "layer", affine=True)
        self.cross_attn = Attention(w, cfg.heads, w)
        self.norm2 = Norm(w, "layer", affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(w, cfg.mlp_ratio * w), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * w, w)
        )
        self.modulation = nn.Linear(w, 6 * w)  # SiLU(e) -> 6 chunks; zero-initialised by init_params

    def forward(self, x: torch.Tensor, e: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(nnf.silu(e))[:, None].chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1 * self.self_attn(h, h)
        x = x + self.cross_attn(self.norm_cross(x), text)
        h = modulate(self.norm2(x), shift2, scale2)
        return x + gate2 * self.mlp(h)


class TinyDiT(nn.Module):
    """forward(x [B, C, T, H, W], c_noise [B], text [B, L, D]) -> v [B, C, T, H, W] (H, W even)."""

    def __init__(self, cfg: TinyDiTConfig = TinyDiTConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Linear(cfg.channels * cfg.patch * cfg.patch, w)
        self.pos_t = nn.Parameter(torch.empty(cfg.max_frames, w))
        self.pos_h = nn.Parameter(torch.empty(cfg.max_patches, w))
        self.pos_w = nn.Parameter(torch.empty(cfg.max_patches, w))
        self.text_embed = nn.Sequential(nn.Linear(cfg.text_dim, w), nn.GELU(approximate="tanh"), nn.Linear(w, w))
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = Norm(w, "layer", affine=False)
        self.head_modulation = nn.Linear(w, 2 * w)
        self.head = nn.Linear(w, cfg.patch * cfg.patch * cfg.channels)

    def check_shapes(self, x: torch.Tensor, c_noise: torch.Tensor, text: torch.Tensor) -> None:
        cfg, patch = self.cfg, self.cfg.patch
        if x.dim() != 5 or x.shape[1] != cfg.channels or x.shape[3] % patch or x.shape[4] % patch:
            raise ValueError(
                f"x must be [B, {cfg.channels}, T, H, W] with H, W divisible by {patch}; got {tuple(x.shape)}"
            )
        if x.shape[2] > cfg.max_frames or max(x.shape[3], x.shape[4]) // patch > cfg.max_patches:
            raise ValueError(
                f"x shape {tuple(x.shape)} exceeds max_frames={cfg.max_frames} or "
                f"max_patches={cfg.max_patches} (H/{patch}, W/{patch})"
            )
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape [B] = [{x.shape[0]}]; got {tuple(c_noise.shape)}")
        if text.dim() != 3 or text.shape[0] != x.shape[0] or text.shape[2] != cfg.text_dim:
            raise ValueError(f"cond must be [B={x.shape[0]}, L, {cfg.text_dim}]; got {tuple(text.shape)}")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.check_shapes(x, c_noise, text)
        b, c, t, h, w = x.shape
        patch = self.cfg.patch
        hp, wp = h // patch, w // patch
        # patchify: tokens in (t, h/p, w/p) order, features flattened in (c, kh, kw) order (SPEC-rcm §8.1)
        tokens = x.reshape(b, c, t, hp, patch, wp, patch).permute(0, 2, 3, 5, 1, 4, 6)
        tokens = self.patch_embed(tokens.reshape(b, t, hp, wp, c * patch * patch))
        pos = self.pos_t[:t, None, None] + self.pos_h[None, :hp, None] + self.pos_w[None, None, :wp]
        tokens = (tokens + pos).reshape(b, t * hp * wp, -1)
        dtype = tokens.dtype
        e = self.time_embed(timestep_embedding(c_noise, self.cfg.freq_dim).to(dtype))
        context = self.text_embed(text.to(dtype))
        for block in self.blocks:
            tokens = block(tokens, e, context)
        shift, scale = self.head_modulation(nnf.silu(e))[:, None].chunk(2, dim=-1)
        out = self.head(modulate(self.norm_out(tokens), shift, scale))
        # unpatchify: [B, t*hp*wp, (kh, kw, c)] -> [B, C, T, H, W]
        out = out.reshape(b, t, hp, wp, patch, patch, c).permute(0, 6, 1, 2, 4, 3, 5)
        return out.reshape(b, c, t, h, w)


LORA_TARGETS = {
    "attention": ("blocks.*_attn.[qkv].weight", "blocks.*_attn.out.weight"),
    "ffn": ("blocks.*.mlp.[02].weight",),
    "modulation": ("blocks.*.modulation.weight", "head_modulation.weight"),
}
"""LoRA target -> weight-key patterns of the tiny DiT (rcmfn/lora.py; Family.lora_targets for the real nets)."""


def init_params(module: TinyDiT, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> TensorDict:
    """Fresh parameters as a flat TensorDict {parameter name: tensor}, drawn from `generator` (CPU).

    Linear weights ~ N(0, 1/fan_in), biases 0, positions ~ N(0, 0.02^2), norm weights 1; the adaLN
    modulations (so every gate starts at 0 and each block is the identity but for cross-attention) and
    the head start at 0, as in DiT, so a fresh net outputs v = 0.
    """
    params = {}
    for name, p in module.named_parameters():
        if name.endswith("bias") or "modulation" in name or name.startswith("head."):
            value = torch.zeros(p.shape, dtype=torch.float64)
        elif name.startswith("pos_"):
            value = 0.02 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
        elif "norm" in name:
            value = torch.ones(p.shape, dtype=torch.float64)
        else:
            value = torch.randn(p.shape, generator=generator, dtype=torch.float64) / math.sqrt(p.shape[1])
        params[name] = value.to(dtype)
    return TensorDict(params, batch_size=[])


def velocity_net(module: TinyDiT):
    """The raw velocity net `net(params, x_in, c_noise, cond) -> v` over `module`. SPEC-rcm §1.2.

    params is a flat TensorDict from `init_params` (or any mapping name -> tensor). The output has the
    params' dtype; x_in and cond are cast to it inside the module.
    """

    def net(params, x_in: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = params["patch_embed.weight"].dtype
        return torch.func.functional_call(module, dict(params.items()), (x_in.to(dtype), c_noise, cond))

    return net
