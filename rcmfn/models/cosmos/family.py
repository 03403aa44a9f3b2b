"""The Cosmos-Predict2 family's conventions (SPEC-models §2): see rcmfn.models.family."""

from rcmfn.models.cosmos.configs import TIMESTEP_SCALE, CosmosConfig
from rcmfn.models.cosmos.exports import comfyui_name, diffusers_config
from rcmfn.models.cosmos.keys import KEY_MAPS
from rcmfn.models.cosmos.model import CosmosDiT, init_random_, velocity_net
from rcmfn.models.family import Family


def text_conditioned_net(module: CosmosDiT):
    """net(params, x, timestep, context); a Video2World net (condition mask input) runs with no
    conditioning frame, i.e. as text-to-video (mask all zeros)."""
    base = velocity_net(module)
    if not module.config.condition_mask:
        return base

    def net(params, x, timestep, context):
        return base(params, x, timestep, context, x.new_zeros(x.shape[0], 1, *x.shape[2:]))

    return net


def forward_flops(cfg: CosmosConfig, tokens: int, text_len: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one forward of one sample (2 per multiply-add).

    Per block: self-attention q, k, v, o (4 D^2 per token), cross-attention q, o (2 D^2 per token) and
    k, v over the T5 states fed directly (2 text_dim D per text token), MLP (2 D F per token); the patch
    embedding and final layer; once per sample the D -> D -> 3 D time MLP and the adaLN-LoRA modulations
    (D -> r -> 3 D, three per block; D -> r -> 2 D in the final layer).
    Exact: tests/entrypoints/test_bench_step.py counts every matmul of the tiny net's forward.
    """
    D, F, N = cfg.dim, cfg.mlp_dim, cfg.num_blocks
    patch_in, patch_out = cfg.patch_in_channels * cfg.patch_volume, cfg.out_channels * cfg.patch_volume
    per_token = N * (6 * D**2 + 2 * D * F) + (patch_in + patch_out) * D
    per_text = N * 2 * cfg.text_dim * D
    r = cfg.adaln_lora_dim
    per_sample = 4 * D**2 + N * 12 * D * r + 3 * D * r
    L, Lc = tokens, text_len
    return float(2 * (per_token * L + per_text * Lc + per_sample)), float(N * (4 * L**2 * D + 4 * L * Lc * D))


COSMOS = Family(
    name="cosmos",
    build=CosmosDiT,
    key_maps=lambda cfg: KEY_MAPS,
    channels=lambda cfg: cfg.in_channels,
    patch=lambda cfg: (cfg.patch_temporal, cfg.patch_spatial, cfg.patch_spatial),
    cp_axes=2,
    depth_field="num_blocks",
    velocity=text_conditioned_net,
    timestep_scale=TIMESTEP_SCALE,
    random_init=init_random_,
    flops=forward_flops,
    negative_prompt=None,  # all-zero text embedding (registry.unconditional_prompt)
    diffusers_config=diffusers_config,
    comfyui_name=comfyui_name,
    lora_targets={
        "attention": ("blocks.*.self_attn.*_proj.weight", "blocks.*.cross_attn.*_proj.weight"),
        "ffn": ("blocks.*.mlp.layer[12].weight",),
        "modulation": ("blocks.*.adaln_modulation_*.weight", "final_layer.adaln_modulation.*.weight"),
    },
)
