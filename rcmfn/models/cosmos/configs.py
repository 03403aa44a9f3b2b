"""Cosmos-Predict2 DiT (MiniTrainDIT) configurations: the released nets and tiny test nets.

SPEC-models §2.1 (hyperparameters of the released configs), §5 (tiny equivalence-test configs).
Presets are plain frozen instances looked up by exact name (STYLE example 15).
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosmosConfig:
    """Shape and numerics of one Cosmos-Predict2 DiT. SPEC-models §2.1-2.3, §2.6."""

    dim: int
    """Model width D (`model_channels`)."""
    num_blocks: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads; head dim = dim / num_heads (128 for 2B/14B, 64 for 0.6B)."""
    mlp_ratio: float = 4.0
    """MLP hidden width = dim * mlp_ratio (GELU, no bias)."""
    in_channels: int = 16
    """Latent channels of x (the Wan2.1 VAE's 16), not counting the mask channels."""
    out_channels: int = 16
    """Channels of the predicted velocity."""
    condition_mask: bool = False
    """Video2World: one extra input channel carrying the condition mask (patch embed 72 wide, not 68)."""
    concat_padding_mask: bool = True
    """Append the padding-mask channel (True in every Predict2 config)."""
    text_dim: int = 1024
    """Width of the cross-attention context (T5-XXL encoder states, fed directly to K/V)."""
    adaln_lora_dim: int = 256
    """Bottleneck of every adaLN modulation MLP and of the shared adaLN-LoRA term."""
    patch_spatial: int = 2
    """Patch size p_h = p_w."""
    patch_temporal: int = 1
    """Patch size p_t."""
    max_img_h: int = 240
    """Largest latent height; RoPE covers max_img_h / patch_spatial token rows (official assert)."""
    max_img_w: int = 240
    """Largest latent width; RoPE covers max_img_w / patch_spatial token columns."""
    max_frames: int = 128
    """Largest latent frame count; the RoPE position table has this many temporal entries."""
    rope_extrapolation: tuple[float, float, float] = (1.0, 4.0, 4.0)
    """RoPE NTK extrapolation ratios (t, h, w): theta_a = 10000 * r_a^(d_a / (d_a - 2)). SPEC §2.3."""
    qk_norm_eps: float = 1e-6
    """Epsilon of the per-head q/k RMSNorm: 1e-6 official; diffusers uses 1e-5 (SPEC §2.8 item 1)."""
    high_precision_time: bool = False
    """Run the time path in float32 whatever the weights' dtype (rCM "high-precision time",
    SPEC-rcm §8.4): time MLP, time RMSNorm, every adaLN modulation MLP, shift/scale and the gated
    residual adds. Off reproduces the official bf16 numerics (sinusoid fp32, the rest in bf16): the
    teacher's. Distillation builds the student and the fake score with it on
    (rcmfn.models.registry.trainable_spec; rCM paper §4.2)."""

    def __post_init__(self):
        for name in (
            "dim",
            "num_blocks",
            "num_heads",
            "in_channels",
            "out_channels",
            "text_dim",
            "adaln_lora_dim",
            "patch_spatial",
            "patch_temporal",
            "max_img_h",
            "max_img_w",
            "max_frames",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CosmosConfig.{name} must be a positive int; got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"CosmosConfig.dim={self.dim} must be divisible by num_heads={self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or 2 * (head_dim // 6) - 2 <= 0:
            # The NTK exponent d_h / (d_h - 2) needs d_h = 2 floor(d/6) > 2 (SPEC §5: d >= 12).
            raise ValueError(f"CosmosConfig head dim dim/num_heads={head_dim} must be even and >= 12")
        if len(self.rope_extrapolation) != 3 or not all(math.isfinite(r) and r > 0 for r in self.rope_extrapolation):
            raise ValueError(
                f"CosmosConfig.rope_extrapolation must be three positive finite ratios (t, h, w); "
                f"got {self.rope_extrapolation!r}"
            )
        if not (self.mlp_ratio > 0 and float(self.dim * self.mlp_ratio).is_integer()):
            raise ValueError(f"CosmosConfig.mlp_ratio={self.mlp_ratio} must give an integer MLP width")
        if not self.qk_norm_eps > 0:
            raise ValueError(f"CosmosConfig.qk_norm_eps must be > 0; got {self.qk_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def patch_in_channels(self) -> int:
        """Channels seen by the patch embedding: latent, then condition mask, then padding mask."""
        return self.in_channels + int(self.condition_mask) + int(self.concat_padding_mask)

    @property
    def patch_volume(self) -> int:
        return self.patch_temporal * self.patch_spatial * self.patch_spatial


TIMESTEP_SCALE = 1.0
"""The net's time input is the rectified-flow t in [0, 1] times this (k = 1 for Cosmos, SPEC §1, §2.5):
a TrigFlow wrapper must feed sin s / (cos s + sin s), not Wan's 1000 times that."""

# Released nets, SPEC-models §2.1. Video2World differs only in the condition channel and RoPE ratios.
COSMOS_0P6B_T2I = CosmosConfig(dim=1280, num_blocks=20, num_heads=20)
COSMOS_2B_T2I = CosmosConfig(dim=2048, num_blocks=28, num_heads=16)
COSMOS_14B_T2I = CosmosConfig(dim=5120, num_blocks=36, num_heads=40)
COSMOS_2B_V2W = CosmosConfig(
    dim=2048, num_blocks=28, num_heads=16, condition_mask=True, rope_extrapolation=(1.0, 3.0, 3.0)
)
COSMOS_14B_V2W = CosmosConfig(
    dim=5120, num_blocks=36, num_heads=40, condition_mask=True, rope_extrapolation=(20.0 / 24.0, 2.0, 2.0)
)

# Tiny nets of the diffusers equivalence recipe (SPEC-models §5): D=32, 2 heads of 16, text 24, LoRA 8.
TINY_T2I = CosmosConfig(dim=32, num_blocks=2, num_heads=2, text_dim=24, adaln_lora_dim=8)
TINY_V2W = CosmosConfig(
    dim=32,
    num_blocks=2,
    num_heads=2,
    text_dim=24,
    adaln_lora_dim=8,
    condition_mask=True,
    rope_extrapolation=(20.0 / 24.0, 2.0, 2.0),
)

CONFIGS: dict[str, CosmosConfig] = {
    "cosmos0.6b": COSMOS_0P6B_T2I,
    "cosmos2b": COSMOS_2B_T2I,
    "cosmos14b": COSMOS_14B_T2I,
    "cosmos2b-video": COSMOS_2B_V2W,
    "cosmos14b-video": COSMOS_14B_V2W,
    "cosmos-tiny": TINY_T2I,
    "cosmos-tiny-video": TINY_V2W,
}
