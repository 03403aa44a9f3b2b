"""Cosmos-Predict2 DiT (MiniTrainDIT): velocity network for text-to-image and Video2World.

SPEC-models §2.2-2.6. Build it on the meta device, materialise it with
`rcmfn.models.checkpoint.load_into_meta_module` (key maps in `keys.py`), and call it through
`torch.func.functional_call(model, params, (x, timestep, context))`. The only hand-written
derivative is attention's, in `ops`; everything here is differentiable by `torch.func.jvp` as is.

Units for `parallel/` (applied from outside, nothing here imports torch.distributed):
`model.blocks` (a ModuleList of `Block`, each one activation-checkpoint / FSDP / compile unit, called
positionally as `block(x, silu_emb, lora, context, rope_cos, rope_sin)`, so it can be replaced in place
by a wrapper with `model.blocks.register_module(str(i), wrapped)`) and `model.final_layer`.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops import attention
from rcmfn.lora_linear import linear_weight
from rcmfn.models.cosmos.configs import CosmosConfig

NORM_EPS = 1e-6  # the no-affine LayerNorms and the time-embedding RMSNorm (official)
ROPE_BASE = 10000.0
TIME_BASE = 10000.0


def timestep_sinusoid(t: Tensor, dim: int) -> Tensor:
    """[cos(t f_k), sin(t f_k)], f_k = exp(-ln(10000) k / (dim/2)), k < dim/2; cos first.

    SPEC-models §2.2 step 4. Built in float32 as the official code does (float64 when t is float64,
    for references); the caller chooses the precision of t.
    """
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(TIME_BASE) * torch.arange(half, dtype=dtype, device=t.device) / half)
    angles = t.to(dtype)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(d_t, d_h, d_w) with d_h = d_w = 2 floor(d/6), d_t = d - 2 d_h. SPEC-models §2.3."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, extrapolation, device) -> Tensor:
    """Angles [phi, phi] of the 3D RoPE for a (T', H', W') token grid, shape [L, head_dim], float32.

    SPEC-models §2.3: per axis theta_a = 10000 r_a^(d_a/(d_a-2)), omega_a,j = theta_a^(-2j/d_a);
    phi(t, h, w) = [t omega_t, h omega_h, w omega_w]; token order t-major, then h, then w.
    Built in float32 like the official code (fps modulation is off in every Predict2 net).
    """
    halves = []
    for axis, (n, d, ratio) in enumerate(zip(grid, rope_axis_dims(head_dim), extrapolation, strict=True)):
        theta = ROPE_BASE * ratio ** (d / (d - 2))
        exponents = torch.arange(0, d, 2, dtype=torch.float32, device=device)[: d // 2] / d
        freqs = 1.0 / (theta**exponents)
        positions = torch.arange(n, dtype=torch.float32, device=device)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        halves.append(torch.outer(positions, freqs).reshape(shape).expand(*grid, d // 2))
    phi = torch.cat(halves, dim=-1).reshape(-1, head_dim // 2)
    return torch.cat([phi, phi], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE x cos + R(x) sin, R(x) = [-x2, x1], on x [B, L, H, d]; cos/sin [L, 1, d].

    SPEC-models §2.3 (non-interleaved). Computed in at least float32, cast back to x's dtype.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, statistics in at least float32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.to(y.dtype)).to(x.dtype)


def linear_in(x: Tensor, layer: nn.Linear) -> Tensor:
    """layer(x) computed in x's dtype (the weight is cast, a no-op when the dtypes agree); a LoRA layer
    with its adapter merged (rcmfn/lora_linear.py)."""
    return F.linear(x, linear_weight(layer).to(x.dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """LayerNorm(x) (1 + scale) + shift in the modulation's dtype, cast back to x's. SPEC §2.2 step 5.

    The norm runs in float32 and is cast explicitly: under torch.func.jvp on CUDA (torch 2.11) a
    bf16 layer_norm returns a float32 tangent beside its bf16 primal, which breaks the next matmul.
    """
    wide = torch.promote_types(shift.dtype, torch.float32)
    y = F.layer_norm(x.to(wide), (x.shape[-1],), eps=NORM_EPS).to(shift.dtype)
    return (y * (1 + scale) + shift).to(x.dtype)


def gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate * y in the modulation's dtype, cast back to x's (the residual stream's) dtype."""
    return (x.to(gate.dtype) + gate * y.to(gate.dtype)).to(x.dtype)


def patchify(x: Tensor, p_t: int, p: int) -> Tensor:
    """[B, C, T, H, W] -> [B, T', H' W', C p_t p p], features ordered (c, i_t, i_h, i_w). SPEC §2.2-2."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // p_t, p_t, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, T // p_t, (H // p) * (W // p), C * p_t * p * p)


def unpatchify(y: Tensor, grid: tuple[int, int, int], p_t: int, p: int) -> Tensor:
    """[B, T', H' W', p p p_t C] with features ordered (i_h, i_w, i_t, c) -> [B, C, T, H, W].

    SPEC-models §2.2 step 8: NOT the inverse of `patchify`'s feature order.
    """
    (B, Tp, Hp, Wp), C = (y.shape[0], *grid), y.shape[-1] // (p * p * p_t)
    y = y.reshape(B, Tp, Hp, Wp, p, p, p_t, C).permute(0, 7, 1, 6, 2, 4, 3, 5)
    return y.reshape(B, C, Tp * p_t, Hp * p, Wp * p)


class RMSNorm(nn.Module):
    """Learnable-weight RMSNorm (official: Transformer Engine RMSNorm, fp32 statistics)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Modulation(nn.Module):
    """adaLN-LoRA modulation: Up(Down(SiLU(e))) + a[..., :n D], split in n (shift, scale[, gate]).

    SPEC-models §2.2 steps 5 and 7. Takes SiLU(e), computed once by `CosmosDiT.forward` for all 85
    modulations of the 2B net: computed in each one, inductor fused the copies into one reduction
    kernel with 63 outputs that ptxas did not finish compiling in 7 minutes (torch 2.11, H200).
    Runs in the dtype of e (float32 under high-precision time).
    """

    def __init__(self, dim: int, lora_dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.down = nn.Linear(dim, lora_dim, bias=False)
        self.up = nn.Linear(lora_dim, chunks * dim, bias=False)

    def forward(self, silu_emb: Tensor, lora: Tensor) -> tuple[Tensor, ...]:
        m = linear_in(linear_in(silu_emb, self.down), self.up)
        return (m + lora[..., : m.shape[-1]]).chunk(self.chunks, dim=-1)


class Attention(nn.Module):
    """Multi-head attention with per-head q/k RMSNorm and optional RoPE, no biases. SPEC §2.2-6."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qk_norm_eps: float):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps)
        self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        # (B, S, H, D) attention; context parallelism swaps in its Ulysses wrapper (parallel/).
        self.attention_fn = attention

    def forward(self, x: Tensor, context: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        heads = (self.num_heads, -1)
        q = self.q_norm(self.q_proj(x).unflatten(-1, heads))
        k = self.k_norm(self.k_proj(context).unflatten(-1, heads))
        v = self.v_proj(context).unflatten(-1, heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.output_proj(self.attention_fn(q, k, v).flatten(-2))


class MLP(nn.Module):
    """layer2(GELU_erf(layer1(x))), no biases. SPEC-models §2.2 step 5."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(F.gelu(self.layer1(x)))


class Block(nn.Module):
    """Modulated self-attention (RoPE), cross-attention to the text, MLP. SPEC-models §2.2 step 5."""

    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        D = cfg.dim
        self.self_attn = Attention(D, D, cfg.num_heads, cfg.qk_norm_eps)
        self.cross_attn = Attention(D, cfg.text_dim, cfg.num_heads, cfg.qk_norm_eps)
        self.mlp = MLP(D, cfg.mlp_dim)
        self.adaln_modulation_self_attn = Modulation(D, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = Modulation(D, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = Modulation(D, cfg.adaln_lora_dim, 3)

    def forward(self, x, silu_emb, lora, context, rope_cos, rope_sin) -> Tensor:
        """x [B, T', S, D]; silu_emb = SiLU(e) [B, Tt, 1, D]; lora [B, Tt, 1, 3D] (Tt = 1 or T');
        context [B, Lc, Dc]."""
        B, T, S, D = x.shape
        shift, scale, gate = self.adaln_modulation_self_attn(silu_emb, lora)
        h = modulate(x, shift, scale).reshape(B, T * S, D)
        y = self.self_attn(h, h, (rope_cos, rope_sin))
        x = gated_add(x, gate, y.reshape(B, T, S, D))
        shift, scale, gate = self.adaln_modulation_cross_attn(silu_emb, lora)
        y = self.cross_attn(modulate(x, shift, scale).reshape(B, T * S, D), context, None)
        x = gated_add(x, gate, y.reshape(B, T, S, D))
        shift, scale, gate = self.adaln_modulation_mlp(silu_emb, lora)
        return gated_add(x, gate, self.mlp(modulate(x, shift, scale)))


class FinalLayer(nn.Module):
    """linear(LayerNorm(x) (1 + scale) + shift) with (shift, scale) from a 2-chunk modulation. §2.2-7."""

    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.adaln_modulation = Modulation(cfg.dim, cfg.adaln_lora_dim, 2)
        self.linear = nn.Linear(cfg.dim, cfg.patch_volume * cfg.out_channels, bias=False)

    def forward(self, x: Tensor, silu_emb: Tensor, lora: Tensor) -> Tensor:
        shift, scale = self.adaln_modulation(silu_emb, lora)
        return self.linear(modulate(x, shift, scale))


class TimeMLP(nn.Module):
    """The adaLN-LoRA term a = linear_2(SiLU(linear_1(s))), D -> D -> 3D, no biases. §2.2-4."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, s: Tensor) -> Tensor:
        return linear_in(F.silu(linear_in(s, self.linear_1)), self.linear_2)


class CosmosDiT(nn.Module):
    """Cosmos-Predict2 MiniTrainDIT; `forward` returns the rectified-flow velocity. SPEC-models §2.

    Inputs of `forward`:
      x              [B, in_channels, T, H, W] latent; the net computes in its weights' dtype.
      timestep       [B] or [B, T'] (per latent frame): the rectified-flow time t in [0, 1] itself
                     (TIMESTEP_SCALE = 1; from EDM sigma, t = sigma / (1 + sigma), and the latent fed
                     is x_sigma (1 - t), SPEC §2.5). Its dtype sets the sinusoid's precision (float32
                     official; bfloat16 reproduces rounded inputs, float64 for references).
      context        [B, Lc, text_dim] T5 states, padded rows zero and attended (no mask).
      condition_mask Video2World only, required there: [B, 1, T, H, W], 1 on conditioning frames
                     (whose timestep the caller sets to 1e-4 / 1.0001, SPEC §2.5); zeros for an
                     image batch. Text-to-image nets reject it.
      padding_mask   [B or 1, 1, H_px, W_px], resized (nearest) to (H, W); None means zeros, the
                     value of every official inference path.
    """

    def __init__(self, config: CosmosConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.x_embedder = nn.Linear(cfg.patch_in_channels * cfg.patch_volume, cfg.dim, bias=False)
        self.t_embedder = TimeMLP(cfg.dim)
        self.t_embedding_norm = RMSNorm(cfg.dim, NORM_EPS)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(cfg)

    @property
    def fp32_patterns(self) -> tuple[str, ...]:
        """Parameters `load_into_meta_module` keeps in float32 under a lower-precision dtype: the
        time path under high-precision time (lossless from bf16 files); none otherwise (the
        official weights are all bf16, SPEC §2.6)."""
        if not self.config.high_precision_time:
            return ()
        return ("t_embedder.*", "t_embedding_norm.*", "*adaln_modulation*")

    def _check_inputs(self, x, timestep, context, condition_mask, padding_mask) -> None:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, T, H, W]; got {tuple(x.shape)}")
        B, _, T, H, W = x.shape
        p, p_t = cfg.patch_spatial, cfg.patch_temporal
        if T % p_t or H % p or W % p:
            raise ValueError(f"x's (T, H, W) = {(T, H, W)} must be divisible by the patch {(p_t, p, p)}")
        limits = (cfg.max_frames // p_t, cfg.max_img_h // p, cfg.max_img_w // p)
        if any(n > m for n, m in zip((T // p_t, H // p, W // p), limits, strict=True)):
            raise ValueError(f"token grid {(T // p_t, H // p, W // p)} exceeds the RoPE table {limits}")
        if (
            timestep.dim() not in (1, 2)
            or timestep.shape[0] != B
            or timestep.dim() == 2
            and (timestep.shape[1] not in (1, T // p_t))
        ):
            raise ValueError(f"timestep must be [B] or [B, T'] = [{B}, {T // p_t}]; got {tuple(timestep.shape)}")
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [{B}, Lc, {cfg.text_dim}]; got {tuple(context.shape)}")
        if cfg.condition_mask and (condition_mask is None or condition_mask.shape != (B, 1, T, H, W)):
            got = None if condition_mask is None else tuple(condition_mask.shape)
            raise ValueError(f"Video2World net needs condition_mask [{B}, 1, {T}, {H}, {W}]; got {got}")
        if not cfg.condition_mask and condition_mask is not None:
            raise ValueError("condition_mask given to a text-to-image net (config.condition_mask=False)")
        if padding_mask is not None and (
            padding_mask.dim() != 4 or padding_mask.shape[0] not in (1, B) or padding_mask.shape[1] != 1
        ):
            raise ValueError(f"padding_mask must be [{B} or 1, 1, H_px, W_px]; got {tuple(padding_mask.shape)}")

    def _input_channels(self, x: Tensor, condition_mask, padding_mask) -> Tensor:
        """[latent, condition mask (V2W), padding mask] along channels. SPEC-models §2.2 step 1."""
        B, _, T, H, W = x.shape
        channels = [x]
        if self.config.condition_mask:
            channels.append(condition_mask.to(x.dtype))
        if self.config.concat_padding_mask:
            if padding_mask is None:
                pad = x.new_zeros(B, 1, T, H, W)
            else:
                pad = F.interpolate(padding_mask.to(x.dtype), size=(H, W), mode="nearest")
                pad = pad.unsqueeze(2).expand(B, 1, T, H, W)
            channels.append(pad)
        return torch.cat(channels, dim=1)

    def forward(self, x, timestep, context, condition_mask=None, padding_mask=None) -> Tensor:
        """Velocity v = eps - x0 for x_t = (1 - t) x0 + t eps, shaped like x. SPEC-models §2.2."""
        self._check_inputs(x, timestep, context, condition_mask, padding_mask)
        cfg = self.config
        p, p_t = cfg.patch_spatial, cfg.patch_temporal
        dtype = self.x_embedder.weight.dtype
        B, _, T, H, W = x.shape
        grid = (T // p_t, H // p, W // p)

        tokens = self.x_embedder(patchify(self._input_channels(x.to(dtype), condition_mask, padding_mask), p_t, p))
        angles = rope_angles(grid, cfg.head_dim, cfg.rope_extrapolation, x.device)[:, None, :]
        rope_cos, rope_sin = torch.cos(angles), torch.sin(angles)

        time_dtype = torch.promote_types(dtype, torch.float32) if cfg.high_precision_time else dtype
        s = timestep_sinusoid(timestep.reshape(B, -1), cfg.dim).to(time_dtype)[:, :, None, :]  # [B, Tt, 1, D]
        lora = self.t_embedder(s)
        silu_emb = F.silu(self.t_embedding_norm(s))

        context = context.to(dtype)
        for block in self.blocks:
            tokens = block(tokens, silu_emb, lora, context, rope_cos, rope_sin)
        return unpatchify(self.final_layer(tokens, silu_emb, lora), grid, p_t, p)


def build_cosmos(config: CosmosConfig, dtype: torch.dtype | None = None) -> CosmosDiT:
    """The net on the meta device (no memory, no init), ready for `load_into_meta_module`."""
    with torch.device("meta"):
        model = CosmosDiT(config)
    return model.to(dtype) if dtype is not None else model


@torch.no_grad()
def init_random_(model: CosmosDiT, generator: torch.Generator) -> CosmosDiT:
    """Fill every parameter in place: Linear weights N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2).

    For benchmarks and tests only (not the official init, which zeroes the modulation Up weights).
    Draws on the parameters' device from `generator`, which must live on that device.
    """
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
        value = 1 + 0.1 * noise if param.dim() == 1 else noise / math.sqrt(param.shape[-1])
        param.copy_(value)
    return model


def random_cosmos(config: CosmosConfig, device, dtype: torch.dtype, seed: int = 0) -> CosmosDiT:
    """A net with random weights allocated directly on `device` in `dtype` (e.g. the 2B for a
    benchmark): built on meta, then `to_empty`, then `init_random_` with a generator seeded `seed`."""
    model = build_cosmos(config, dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return init_random_(model, generator)


def velocity_net(model: CosmosDiT):
    """net(params, x, timestep, context, condition_mask=None) = functional_call(model, params, ...).

    rcmfn's velocity-net signature; `timestep` is the rectified-flow t in [0, 1] (TIMESTEP_SCALE).
    """

    def net(params, x: Tensor, timestep: Tensor, context: Tensor, condition_mask: Tensor | None = None):
        kwargs = {} if condition_mask is None else {"condition_mask": condition_mask}
        return torch.func.functional_call(model, dict(params.items()), (x, timestep, context), kwargs)

    return net
