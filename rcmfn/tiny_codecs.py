"""A tiny random Wan2.2-layout VAE for tests and offline demos (the Wan2.1 one is codecs.write_tiny_vae).

The layout is the release's (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json, as diffusers'
scripts/convert_wan_to_diffusers.py writes it): z_dim 48, pixels patchified 2x2 into 12 channels,
residual down/up blocks, scale_factor_spatial 16, scale_factor_temporal 4; only the widths are tiny.
"""

import os
from pathlib import Path

import torch

from rcmfn.codecs import require

WAN22_LATENT_CHANNELS = 48
WAN22_VAE_STRIDE = (4, 16, 16)


def write_tiny_wan22_vae(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random Wan2.2-layout VAE (48 latent channels, stride 4/16/16) as folder/vae.

    The latent statistics are random too (means near 0, stds near 1), so normalisation is exercised.
    """
    diffusers = require("diffusers")
    torch.manual_seed(seed)
    stats = torch.randn(2, WAN22_LATENT_CHANNELS, generator=torch.Generator().manual_seed(seed)) * 0.1
    model = diffusers.AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=WAN22_LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=WAN22_VAE_STRIDE[0],
        scale_factor_spatial=WAN22_VAE_STRIDE[1],
        latents_mean=stats[0].tolist(),
        latents_std=(1.0 + stats[1]).tolist(),
    )
    model.save_pretrained(Path(folder) / "vae")
    return Path(folder)
