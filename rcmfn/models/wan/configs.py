"""Wan DiT architectures: Wan2.1 T2V 1.3B and 14B, Wan2.2 TI2V-5B and tiny test models, as frozen configs.

SPEC-models §3.1 (hyperparameters), §5 (the tiny config the equivalence test uses).
"""

from dataclasses import dataclass

from rcmfn.switch import ExpertSwitch


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan2.1 DiT: text-to-video (`WanModel` model_type "t2v") or, with `image_dim` set,
    image-to-video (model_type "i2v")."""

    dim: int
    """Model width D."""
    ffn_dim: int
    """Hidden width of the feed-forward network."""
    num_heads: int
    """Attention heads; head dim = dim / num_heads (128 in both releases)."""
    num_layers: int
    """Number of transformer blocks."""
    freq_dim: int = 256
    """Width of the timestep sinusoid fed to the time MLP."""
    text_dim: int = 4096
    """Width of the text-encoder states (umT5-XXL: 4096)."""
    in_dim: int = 16
    """Latent channels in."""
    out_dim: int = 16
    """Latent channels out (the velocity)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch (t, h, w) of the patch embedding; the latent T, H, W must divide by it."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm and of the q/k RMSNorms."""
    rope_theta: float = 10000.0
    """RoPE base, the same for the t, h and w axes."""
    image_dim: int | None = None
    """I2V only: width of the CLIP image states (1280, ViT-H/14); None for text-to-video. Adds the image
    projection `img_emb` and the image keys/values of every cross-attention (Wan-Video/Wan2.1
    wan/modules/model.py:187-229, :487-488)."""
    image_tokens: int = 257
    """I2V only: image tokens per sample (ViT-H/14 at 224 px: 16 x 16 patches + the class token)."""
    condition_channels: int = 0
    """I2V only: condition channels concatenated after the noisy latent, inside `in_dim` (20 = a 4-channel
    first-frame mask + the 16-channel VAE latent; wan/image2video.py:210-249, model.py:530-531)."""

    def __post_init__(self):
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 != 0 or self.head_dim < 6:
            raise ValueError(f"head dim dim/num_heads={self.head_dim} must be even and >= 6 (3-axis RoPE)")
        if self.freq_dim % 2 != 0:
            raise ValueError(f"freq_dim={self.freq_dim} must be even (cos and sin halves)")
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "in_dim", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.image_dim is not None and (self.image_dim < 1 or self.image_tokens < 1):
            raise ValueError(f"image_dim={self.image_dim}, image_tokens={self.image_tokens} must be >= 1")
        if not 0 <= self.condition_channels < self.in_dim:
            raise ValueError(f"condition_channels={self.condition_channels} must be in [0, in_dim={self.in_dim})")
        if (self.image_dim is None) != (self.condition_channels == 0):
            raise ValueError("image_dim and condition_channels come together (I2V) or not at all (T2V)")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size={self.patch_size} must be three positive ints (t, h, w)")

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latent x (in_dim without the condition channels)."""
        return self.in_dim - self.condition_channels

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Real RoPE dims per axis (t, h, w): h = w = 2 floor(d/6), t = the rest (44/42/42 at d=128)."""
        spatial = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * spatial, spatial, spatial


# Wan2.1's default negative prompt (`sample_neg_prompt` in Wan-Video/Wan2.1 wan/configs/shared_config.py),
# the unconditional input of the official rCM data and teacher (NVlabs/rcm
# rcm/configs/experiments/rcm/wan2pt1_t2v.py:120 neg_embed_path; SPEC-rcm §6.2, §11.2).
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

WAN_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# SPEC-models §5: two heads of dim 16 (RoPE split 8/4/4), text width 24, two blocks.
WAN_TINY = WanConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=24)

# Wan2.2 TI2V-5B (Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py:20-29: patch (1, 2, 2), dim 3072, ffn 14336,
# freq_dim 256, 24 heads, 30 layers, qk_norm, cross_attn_norm, eps 1e-6; text_len 512 and umT5-XXL from
# shared_config.py:9-11): the Wan2.1 block, 48 latent channels in and out (the Wan2.2 VAE's z_dim,
# vae_stride (4, 16, 16) at :17). The hub's diffusers config (Wan-AI/Wan2.2-TI2V-5B-Diffusers
# transformer/config.json) says the same: in/out_channels 48, 24 heads x 128, ffn_dim 14336, 30 layers.
WAN22_TI2V_5B = WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)
# Tiny Wan2.2-shaped net (48 channels; CPU tests and runs): four heads of dim 12 (RoPE 4/4/4), so that
# context parallelism of 2 divides the heads.
WAN22_TINY = WanConfig(dim=48, ffn_dim=40, num_heads=4, num_layers=2, text_dim=20, in_dim=48, out_dim=48)
# Image-to-video 14B (Wan-Video/Wan2.1 wan/configs/wan_i2v_14B.py:27-36): the T2V 14B's transformer with
# in_dim 36 = 16 noisy + 20 condition channels (model.py:387 docstring, image2video.py:249) and the CLIP
# image branch; the same network serves 480p and 720p (generate.py SUPPORTED_SIZES 'i2v-14B').
WAN_I2V_14B = WanConfig(
    dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, image_dim=1280, condition_channels=20
)
# A tiny I2V net for tests and CPU smoke runs: WAN_TINY's shape with a 20-wide image state of 5 tokens.
WAN_I2V_TINY = WanConfig(
    dim=32,
    ffn_dim=48,
    num_heads=2,
    num_layers=2,
    text_dim=24,
    in_dim=36,
    image_dim=20,
    image_tokens=5,
    condition_channels=20,
)
# The I2V release's negative prompt: the shared one with "镜头晃动，" (camera shake) in front
# (Wan-Video/Wan2.1 wan/configs/wan_i2v_14B.py:11).
I2V_NEGATIVE_PROMPT = "镜头晃动，" + NEGATIVE_PROMPT
# Wan2.2 T2V A14B: two experts, each the Wan2.1 14B architecture (Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py:
# dim 5120, ffn_dim 13824, freq_dim 256, num_heads 40, num_layers 40, text_len 512, in/out 16, qk_norm,
# cross_attn_norm, eps 1e-6; high_noise_checkpoint 'high_noise_model', low_noise_checkpoint 'low_noise_model'),
# switched at boundary 0.875 of the 1000 training timesteps with sample_guide_scale (3.0, 4.0) = (low, high)
# (same file, "inference"; sample_shift 12.0, sample_steps 40). I2V A14B uses boundary 0.900
# (wan/configs/wan_i2v_A14B.py), as the released rCM Wan2.2 I2V script (NVlabs/rcm
# rcm/inference/wan2pt2_i2v_rcm_infer.py, --boundary 0.9).
WAN22_T2V_A14B = WAN_14B
WAN22_T2V_A14B_SWITCH = ExpertSwitch(boundary=0.875, guidance_high=4.0, guidance_low=3.0)
WAN22_SAMPLE_SHIFT = 12.0
