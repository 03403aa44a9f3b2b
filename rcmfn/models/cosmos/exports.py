"""How other tools name a Cosmos-Predict2 DiT: diffusers' `CosmosTransformer3DModel` config, ComfyUI's names.

diffusers: the config entries of `CosmosTransformer3DModel.__init__` (diffusers
src/diffusers/models/transformers/transformer_cosmos.py, `@register_to_config`), filled as the released
`nvidia/Cosmos-Predict2-{2B,14B}-Text2Image` transformer/config.json fill them. diffusers fixes the q/k
RMSNorm epsilon at 1e-5 where the release uses 1e-6 (SPEC-models §2.8 item 1): a diffusers export of a
1e-6 config runs with 1e-5 there, as every diffusers Cosmos-Predict2 checkpoint does (< 1e-3 apart).
ComfyUI: its Predict2 module tree (comfy/ldm/cosmos/predict2.py) mirrors the release, so a tensor's
ComfyUI name is the official one, without the release's `net.` wrapper, under `diffusion_model.`.
"""

from rcmfn.models.cosmos.configs import CosmosConfig
from rcmfn.models.cosmos.keys import OFFICIAL, OURS, translate

DIFFUSERS_CLASS = "CosmosTransformer3DModel"
DIFFUSERS_QK_NORM_EPS = 1e-5
COMFYUI_PREFIX = "diffusion_model."


def diffusers_config(cfg: CosmosConfig) -> tuple[str, dict]:
    """(class name, config.json entries) of the diffusers transformer with `cfg`'s shapes.

    diffusers' in_channels counts the Video2World condition-mask channel (17) but not the padding mask,
    which `concat_padding_mask` adds; Predict2 has no extra learnable position embedding.
    """
    return DIFFUSERS_CLASS, {
        "in_channels": cfg.in_channels + int(cfg.condition_mask),
        "out_channels": cfg.out_channels,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "num_layers": cfg.num_blocks,
        "mlp_ratio": cfg.mlp_ratio,
        "text_embed_dim": cfg.text_dim,
        "adaln_lora_dim": cfg.adaln_lora_dim,
        "max_size": [cfg.max_frames, cfg.max_img_h, cfg.max_img_w],
        "patch_size": [cfg.patch_temporal, cfg.patch_spatial, cfg.patch_spatial],
        "rope_scale": list(cfg.rope_extrapolation),
        "concat_padding_mask": cfg.concat_padding_mask,
        "extra_pos_embed_type": None,
    }


def comfyui_name(name: str) -> str:
    """Our tensor name -> ComfyUI's, e.g. blocks.0.self_attn.q_proj.weight -> diffusion_model.blocks.0.
    self_attn.q_proj.weight; KeyError for a name that is not a Cosmos-Predict2 tensor."""
    official = translate(name, OURS, OFFICIAL)
    if official is None:
        raise KeyError(f"{name!r} is not a Cosmos-Predict2 tensor name")
    return COMFYUI_PREFIX + official
