"""Wan2.1 image-to-video: the first-frame condition, the net over a TensorDict condition, the family.

The I2V network (WanConfig with image_dim set) is the T2V DiT plus two image inputs (Wan-Video/Wan2.1
wan/image2video.py:181-296):
- "image": the CLIP ViT-H/14 states of the input image [B, 257, 1280], the vision tower's output after
  31 of its 32 blocks (wan/modules/clip.py, `use_31_block=True` in `visual`), taken from the image alone;
- "latent": [B, 20, T, H, W], a 4-channel mask that is 1 on the first latent frame (the 4 mask channels
  are the VAE's 4-frame temporal stride, the first pixel frame repeated 4 times; image2video.py:210-217),
  then the 16-channel VAE latent of the video [image, 0, 0, ...] of the sample's frame count
  (image2video.py:240-249: the first frame followed by zero frames, encoded together).
Both travel in the condition TensorDict (rcmfn.condition) next to "text"; CFG's uncondition keeps them.
`WanModel.forward` unpacks that TensorDict itself, so the I2V velocity net is T2V's (net(params, x, t, cond)).
"""

import dataclasses
import math

import torch
from torch import Tensor

from rcmfn.condition import Condition, make_condition
from rcmfn.models.wan.configs import I2V_NEGATIVE_PROMPT, WanConfig
from rcmfn.models.wan.family import WAN, forward_flops

IMAGE, LATENT = "image", "latent"
MASK_CHANNELS = 4  # the Wan2.1 VAE's temporal stride: latent frame 0 holds pixel frame 0 four times


def first_frame_mask(latent_shape: tuple[int, int, int], dtype=torch.float32, device=None) -> Tensor:
    """[4, T, H, W]: 1 on latent frame 0 (the given image), 0 on the frames to generate.

    image2video.py:210-217 builds it over pixel frames (1 on frame 0, repeated 4 times, then grouped by 4
    into latent frames); every group after the first is all 0, so this is the same tensor.
    """
    T, H, W = latent_shape
    mask = torch.zeros(MASK_CHANNELS, T, H, W, dtype=dtype, device=device)
    mask[:, 0] = 1.0
    return mask


def image_condition(text: Tensor, image: Tensor, video_latent: Tensor) -> Condition:
    """The I2V condition of a batch: text [B, L, D], CLIP image states [B, 257, 1280] and the VAE latent
    [B, 16, T, H, W] of [first frame, zero frames...]; the mask is put in front (image2video.py:249)."""
    mask = first_frame_mask(tuple(video_latent.shape[2:]), video_latent.dtype, video_latent.device)
    latent = torch.cat([mask.expand(video_latent.shape[0], *mask.shape), video_latent], dim=1)
    return make_condition(text, **{IMAGE: image, LATENT: latent})


def random_condition(cfg: WanConfig, text: Tensor, latent_shape, generator: torch.Generator) -> Condition:
    """A random I2V condition for `text` [B, L, D] at a [C, T, H, W] latent: N(0, 1) image states and
    first-frame latent (benchmarks and smoke runs; the mask is the real one)."""
    B, device = text.shape[0], text.device
    image = torch.randn(B, cfg.image_tokens, cfg.image_dim, generator=generator, device=device).to(text.dtype)
    latent = torch.randn(B, cfg.latent_channels, *latent_shape[1:], generator=generator, device=device)
    return image_condition(text, image, latent.to(text.dtype))


def i2v_flops(cfg: WanConfig, tokens: int, text_len: int) -> tuple[float, float]:
    """T2V's count (`forward_flops`), whose patch embedding and head both use in_dim, with the head's
    out_dim instead (16, not 36), plus the image branch: per block the image k, v (2 D^2 per image token)
    and the image attention (4 L N_img D); once the projection 1280 -> 1280 -> D of the image tokens.
    Exact: tests/entrypoints/test_bench_step.py counts every matmul of the tiny net's forward."""
    linear, attention = forward_flops(cfg, tokens, text_len)
    n, width, D, patch = cfg.image_tokens, cfg.image_dim, cfg.dim, math.prod(cfg.patch_size)
    linear -= 2.0 * tokens * (cfg.in_dim - cfg.out_dim) * patch * D
    linear += 2.0 * n * (cfg.num_layers * 2 * D**2 + width**2 + width * D)
    return linear, attention + float(cfg.num_layers * 4 * tokens * n * D)


# Wan2.1 T2V's conventions, with the condition latent's channels, the image branch's FLOPs, the I2V
# negative prompt, its random / real conditions, and LoRA on the image keys' and values' projections too.
WAN_I2V = dataclasses.replace(
    WAN,
    name="wan-i2v",
    channels=lambda cfg: cfg.latent_channels,
    flops=i2v_flops,
    negative_prompt=I2V_NEGATIVE_PROMPT,
    random_condition=random_condition,
    image_condition=image_condition,
    lora_targets={
        **WAN.lora_targets,
        "attention": (*WAN.lora_targets["attention"], "blocks.*.cross_attn.[kv]_img.weight"),
    },
)
