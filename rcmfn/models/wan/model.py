"""Wan2.1 T2V / I2V DiT: v = net(x, 1000 r, text[, image, condition]), one module whose parameters are passed in.

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
from rcmfn.models.wan.ti2v import FIRST_FRAME, first_frame_forward

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


def modulation_terms(table: Tensor, e: Tensor) -> tuple[Tensor, ...]:
    """The rows of table (1, n, D) + e, each broadcastable against the tokens (B, L, D).

    e is (B, n, D) for one timestep per sample (Wan2.1), each row then (B, 1, D); or (B, L, n, D) for a
    timestep per token (Wan2.2 TI2V: Wan-Video/Wan2.2 wan/modules/model.py:239 and :287 add the table
    to e[:, :, None]-shaped per-token embeddings), each row then (B, L, D).
    """
    if e.dim() == 3:
        return (table + e).chunk(table.shape[1], dim=1)
    return (table[:, None] + e).unbind(dim=2)


class ImageCrossAttention(Attention):
    """I2V cross-attention (official `WanI2VCrossAttention`, Wan-Video/Wan2.1 wan/modules/model.py:187-229):
    one query attends separately to the image tokens (own k_img, v_img, norm_k_img) and to the text,
    and the two outputs are summed before `o`. `source` is [image tokens; text], both embedded to D."""

    def __init__(self, cfg: WanConfig, attention_fn: AttentionFn):
        super().__init__(cfg, attention_fn)
        self.k_img, self.v_img = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.norm_k_img = RMSNorm(cfg.dim)
        self.image_tokens = cfg.image_tokens

    def forward(self, x: Tensor, source: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        heads = (self.num_heads, -1)
        image, text = source[:, : self.image_tokens], source[:, self.image_tokens :]
        q = rms_norm(self.q(x), self.norm_q.weight, self.eps).unflatten(-1, heads).to(x.dtype)
        k = rms_norm(self.k(text), self.norm_k.weight, self.eps).unflatten(-1, heads).to(x.dtype)
        k_img = rms_norm(self.k_img(image), self.norm_k_img.weight, self.eps).unflatten(-1, heads).to(x.dtype)
        # Keys and values come from the condition only: under jvp they carry no tangent, so ops.attention
        # takes its no-K/V-tangent kernel for both calls, as for T2V's text (ops/attention/op.py).
        out = self.attention_fn(q, k, self.v(text).unflatten(-1, heads))
        out_img = self.attention_fn(q, k_img, self.v_img(image).unflatten(-1, heads))
        return self.o((out + out_img).flatten(2))


class ImageProjection(nn.Module):
    """CLIP image states -> D (official `MLPProj`, model.py:350-369): LayerNorm, Linear, exact GELU,
    Linear, LayerNorm. The norms run in the wide dtype (diffusers' FP32LayerNorm; the release runs
    this under bf16 autocast, where layer_norm is float32), the linears in the act dtype."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        width = cfg.image_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(width, eps=1e-5),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, cfg.dim),
            nn.LayerNorm(cfg.dim, eps=1e-5),
        )

    def forward(self, image: Tensor, act: torch.dtype) -> Tensor:
        norm_in, linear_1, _, linear_2, norm_out = self.proj
        y = layer_norm(image, norm_in.eps, norm_in.weight, norm_in.bias).to(act)
        y = linear_2(F.gelu(linear_1(y)))
        return layer_norm(y, norm_out.eps, norm_out.weight, norm_out.bias).to(act)


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, plain cross-attention, modulated FFN. SPEC §3.2 step 4."""

    def __init__(self, cfg: WanConfig, attention_fn: AttentionFn):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = Attention(cfg, attention_fn)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps)  # the affine cross-attention norm
        self.cross_attn = (Attention if cfg.image_dim is None else ImageCrossAttention)(cfg, attention_fn)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        """x (B, L, D) residual stream and e0 (B, 6, D), or per token (B, L, 6, D), in the wide dtype;
        context (B, Lc, D) in act."""
        act = context.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = modulation_terms(self.modulation.to(x.dtype), e0)
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

    SPEC-models §3.2. `attention_fn` defaults to `ops.attention` (B, S, H, D). Also Wan2.2 TI2V-5B
    (48 channels, configs.WAN22_TI2V_5B), which may take a timestep per token, [B, L] in the tokens'
    t-major order (its image-to-video mode gives the clean first frame's tokens timestep 0).
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
        "*.norm_k_img.*",
        "img_emb.proj.0.*",
        "img_emb.proj.4.*",
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
        if cfg.image_dim is not None:
            self.img_emb = ImageProjection(cfg)

    def check_inputs(self, x: Tensor, timestep: Tensor, context: Tensor, image=None, condition=None) -> None:
        """Raise ValueError naming the first input whose shape does not fit the config."""
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.latent_channels:
            raise ValueError(f"x must be [B, {cfg.latent_channels}, T, H, W]; got {tuple(x.shape)}")
        if cfg.image_dim is None and (image is not None or condition is not None):
            raise ValueError("image / condition given to a text-to-video net (config.image_dim is None)")
        if cfg.image_dim is not None:
            B, want = x.shape[0], (x.shape[0], cfg.condition_channels, *x.shape[2:])
            if condition is None or tuple(condition.shape) != want:
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(f"I2V net needs condition (mask + first-frame latent) {list(want)}; got {got}")
            if image is None or tuple(image.shape) != (B, cfg.image_tokens, cfg.image_dim):
                got = None if image is None else tuple(image.shape)
                raise ValueError(f"I2V net needs image states [{B}, {cfg.image_tokens}, {cfg.image_dim}]; got {got}")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True)):
            raise ValueError(f"x's T, H, W {tuple(x.shape[2:])} must divide by patch_size {cfg.patch_size}")
        tokens = math.prod([s // p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True)])
        if timestep.shape not in ((x.shape[0],), (x.shape[0], tokens)):
            raise ValueError(
                f"timestep must be [B] = [{x.shape[0]}] or per token [B, L] = [{x.shape[0]}, {tokens}]; "
                f"got {tuple(timestep.shape)}"
            )
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [{x.shape[0]}, Lc, {cfg.text_dim}]; got {tuple(context.shape)}")

    def time_embeddings(self, timestep: Tensor, wide: torch.dtype) -> tuple[Tensor, Tensor]:
        """e (B, D) and e0 (B, 6, D) in the wide dtype. SPEC-models §3.2 step 2, SPEC-rcm §8.4.

        A per-token timestep [B, L] (Wan2.2 TI2V) gives e (B, L, D) and e0 (B, L, 6, D): the same MLP on
        every token's own sinusoid (Wan-Video/Wan2.2 wan/modules/model.py:460-468).
        """
        sinusoid = timestep_sinusoid(timestep.flatten(), self.cfg.freq_dim, self.sinusoid_dtype).to(wide)
        e = wide_linear(F.silu(wide_linear(sinusoid, self.time_embedding[0], wide)), self.time_embedding[2], wide)
        e0 = wide_linear(F.silu(e), self.time_projection[1], wide)
        e, e0 = e.unflatten(0, timestep.shape), e0.unflatten(0, timestep.shape)
        return e, e0.unflatten(-1, (6, -1))

    def forward(
        self, x: Tensor, timestep: Tensor, context, image: Tensor | None = None, condition: Tensor | None = None
    ) -> Tensor:
        """Velocity v (B, out_dim, T, H, W) in the wide dtype. SPEC-models §3.2.

        I2V (config.image_dim set) also takes the CLIP image states `image` [B, image_tokens, image_dim]
        and `condition` [B, condition_channels, T, H, W] (mask, then the first-frame latent), which is
        concatenated after x on the channel axis (official model.py:530-531); the embedded image tokens
        go in front of the text (model.py:561-563). `context` may also be a condition TensorDict holding
        all three (rcmfn.condition; "text", "image", "latent"), so every caller's net(x, t, cond) works.
        """
        if not isinstance(context, Tensor) and FIRST_FRAME in context.keys():  # Wan2.2 TI2V's image-to-video
            return first_frame_forward(self.forward, x, timestep, context, tuple(self.cfg.patch_size))
        if not isinstance(context, Tensor):
            context, image, condition = context["text"], context["image"], context["latent"]
        self.check_inputs(x, timestep, context, image, condition)
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        cfg = self.cfg
        act = self.patch_embedding.weight.dtype
        wide = torch.promote_types(act, torch.float32)
        grid = tuple(s // p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True))
        weight = self.patch_embedding.weight.flatten(1)
        h = F.linear(patchify(x.to(act), cfg.patch_size), weight, self.patch_embedding.bias).to(wide)
        e, e0 = self.time_embeddings(timestep, wide)
        c = self.text_embedding(context.to(act))
        if image is not None:
            c = torch.cat([self.img_emb(image, act), c], dim=1)
        angles = rope_angles(grid, cfg, x.device)
        rope_cos, rope_sin = torch.cos(angles).to(wide), torch.sin(angles).to(wide)
        for block in self.blocks:
            h = block(h, e0, c, rope_cos, rope_sin)
        shift, scale = modulation_terms(self.head.modulation.to(wide), e[..., None, :])
        out = wide_linear(layer_norm(h, cfg.eps) * (1 + scale) + shift, self.head.head, wide)
        return unpatchify(out, grid, cfg.patch_size)


def velocity_net(model: WanModel) -> Callable[[Mapping[str, Tensor], Tensor, Tensor, Tensor], Tensor]:
    """net(params, x, timestep, context) = functional_call(model, params, ...): rcmfn's velocity net."""

    def net(params: Mapping[str, Tensor], x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(params.items()), (x, timestep, context))

    return net
