"""Wan2.2 TI2V-5B's image-to-video timesteps: the clean first latent frame's tokens get timestep 0.

Wan-Video/Wan2.2 wan/textimage2video.py:550-551 keeps the first latent frame equal to the encoded
image (mask 0 there, 1 elsewhere; wan/utils/utils.py:172-199 `masks_like(zero=True)`), builds the
per-token timestep as that mask subsampled to the token grid times t (:573-578), and writes the image
back after every scheduler step (:598). diffusers does the same (pipelines/wan/pipeline_wan_i2v.py
`expand_timesteps`, first_frame_mask). In text-to-video every token shares t, i.e. a [B] timestep.
"""

import torch
from torch import Tensor


def first_frame_timesteps(timestep: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Per-token timesteps [B, T' H' W'] (t-major, the model's token order) from one timestep per sample
    [B]: 0 for the tokens of the first latent frame, `timestep` for all others (patch_t = 1 as in the
    release, so token frame 0 is latent frame 0)."""
    if timestep.dim() != 1:
        raise ValueError(f"timestep must be [B]; got {tuple(timestep.shape)}")
    T, H, W = grid
    keep = torch.ones(T, H * W, dtype=timestep.dtype, device=timestep.device)
    keep[0] = 0.0
    return timestep[:, None] * keep.flatten()[None, :]


def keep_first_frame(latent: Tensor, image_latent: Tensor) -> Tensor:
    """`latent` [B, C, T, H, W] with its first frame replaced by the image's latent [B, C, 1, H, W]
    (the release's `(1 - mask) * z + mask * latent`, written as a concatenation: no 0 * inf)."""
    if image_latent.shape != (*latent.shape[:2], 1, *latent.shape[3:]):
        raise ValueError(
            f"image latent must be {(*latent.shape[:2], 1, *latent.shape[3:])}; got {tuple(image_latent.shape)}"
        )
    return torch.cat([image_latent.to(latent.dtype), latent[:, :, 1:]], dim=2)
