"""The Wan2.1 family's conventions (SPEC-models §3), and Wan2.2 TI2V's: see rcmfn.models.family."""

import dataclasses

from rcmfn.models.family import Family
from rcmfn.models.wan.configs import NEGATIVE_PROMPT, WanConfig
from rcmfn.models.wan.exports import comfyui_name, diffusers_config
from rcmfn.models.wan.keys import key_maps
from rcmfn.models.wan.model import WanModel, velocity_net
from rcmfn.models.wan.ti2v import first_frame_condition


def forward_flops(cfg: WanConfig, tokens: int, text_len: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one forward of one sample (2 per multiply-add).

    Per block: self-attention q, k, v, o (4 D^2 per token), cross-attention q, o (2 D^2 per token) and
    k, v over the text embedded to D first (2 D^2 per text token), MLP (2 D F per token); the patch
    embedding and head; the text embedding MLP; once per sample the sinusoid -> D -> D -> 6 D time MLP.
    Exact: tests/entrypoints/test_bench_step.py counts every matmul of the tiny net's forward.
    """
    D, F, N = cfg.dim, cfg.ffn_dim, cfg.num_layers
    patch = cfg.in_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    per_token = N * (6 * D**2 + 2 * D * F) + 2 * patch * D
    per_text = N * 2 * D**2 + cfg.text_dim * D + D**2
    per_sample = cfg.freq_dim * D + 7 * D**2
    L, Lc = tokens, text_len
    return float(2 * (per_token * L + per_text * Lc + per_sample)), float(N * (4 * L**2 * D + 4 * L * Lc * D))


WAN = Family(
    name="wan",
    build=WanModel,
    key_maps=key_maps,
    channels=lambda cfg: cfg.in_dim,
    patch=lambda cfg: tuple(cfg.patch_size),
    cp_axes=3,
    depth_field="num_layers",
    velocity=velocity_net,
    timestep_scale=1000.0,
    random_init=lambda module, generator: module,  # the module's own init, as built
    flops=forward_flops,
    negative_prompt=NEGATIVE_PROMPT,
    diffusers_config=diffusers_config,
    comfyui_name=comfyui_name,
    # time_projection is the one D -> 6D linear all blocks' modulation comes from (e0, SPEC-models §3.2).
    lora_targets={
        "attention": ("blocks.*.self_attn.[qkvo].weight", "blocks.*.cross_attn.[qkvo].weight"),
        "ffn": ("blocks.*.ffn.0.weight", "blocks.*.ffn.2.weight"),
        "modulation": ("time_projection.1.weight",),
    },
)

# Wan2.1 T2V's conventions plus the TI2V release's image-to-video mode on the latent's own first frame
# (rcmfn/models/wan/ti2v.py; the net reads that condition itself, in WanModel.forward).
WAN22_TI2V = dataclasses.replace(WAN, name="wan2.2-ti2v", latent_condition=first_frame_condition)
