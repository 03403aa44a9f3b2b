"""How other tools name a Wan2.1 DiT: diffusers' `WanTransformer3DModel` config, ComfyUI's tensor names.

diffusers: the config entries of `WanTransformer3DModel.__init__` (diffusers
src/diffusers/models/transformers/transformer_wan.py, `@register_to_config`), filled as the released
`Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers` transformer/config.json fill them for text-to-video.
ComfyUI: its Wan module tree (comfy/ldm/wan/model.py) mirrors the release, so a tensor's ComfyUI name is
the official one under the `diffusion_model.` prefix every ComfyUI diffusion model carries
(comfy/lora.py `model_lora_keys_unet`).
"""

import math

from rcmfn.models.wan.configs import WanConfig

DIFFUSERS_CLASS = "WanTransformer3DModel"
DIFFUSERS_ROPE_THETA = 10000.0  # diffusers' WanRotaryPosEmbed has no theta option: 10000 fixed
COMFYUI_PREFIX = "diffusion_model."


def diffusers_config(cfg: WanConfig) -> tuple[str, dict]:
    """(class name, config.json entries) of the diffusers transformer equal to `cfg`'s network.

    T2V: no image cross-attention (image_dim, added_kv_proj_dim None); I2V: CLIP states of image_dim
    through the image projection and added K/V projections of width D in every cross-attention. Affine
    cross-attention norm, RMSNorm of q and k across heads, RoPE table of 1024 positions per axis (the release's).
    """
    if not math.isclose(cfg.rope_theta, DIFFUSERS_ROPE_THETA):
        raise ValueError(f"diffusers' Wan transformer fixes rope_theta at 10000; this config has {cfg.rope_theta}")
    return DIFFUSERS_CLASS, {
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": cfg.image_dim,
        "added_kv_proj_dim": None if cfg.image_dim is None else cfg.dim,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def comfyui_name(name: str) -> str:
    """Our (= the official) tensor name -> ComfyUI's, e.g. blocks.0.self_attn.q.weight ->
    diffusion_model.blocks.0.self_attn.q.weight."""
    return COMFYUI_PREFIX + name
