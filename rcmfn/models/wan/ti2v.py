"""Wan2.2 TI2V-5B's image-to-video mode: the clean first latent frame's tokens get timestep 0.

Wan-Video/Wan2.2 wan/textimage2video.py:550-551 keeps the first latent frame equal to the encoded
image (mask 0 there, 1 elsewhere; wan/utils/utils.py:172-199 `masks_like(zero=True)`), builds the
per-token timestep as that mask subsampled to the token grid times t (:573-578), and writes the image
back after every scheduler step (:598). diffusers does the same (pipelines/wan/pipeline_wan_i2v.py
`expand_timesteps`, first_frame_mask). In text-to-video every token shares t, i.e. a [B] timestep.

rcmfn trains and samples that mode without touching the losses or the samplers: the condition
(`first_frame_condition`: text, the image's latent frame, and per sample whether to use it) travels
through the loop like any (rcmfn.condition), and the net (WanModel.forward -> `first_frame_forward`) feeds itself
the release's input (first frame replaced, per-token timesteps) and answers, on the first frame, the exact
velocity of a frame known to be the image, v = (x_r - image) / r, whose denoised x0 = x_r - r v is the
image at every time. That is the true teacher there (the data's first frame is the image, so
E[x0 | x_r] = image), so teacher, student and fake score agree on it exactly: its sCM target and its
consistency tangent vanish (x0 is constant along the ODE), DMD's real and fake x0 coincide, the fake
score's flow-matching target is met, and no trainable weight reaches it -- the first frame adds no
gradient, as the release's loss mask would do, and every sampler returns the image as the first frame.
(Unlike a mask, the first frame's zeros still count in the losses' means over elements and in DMD's
normaliser, which scales the other frames' weight by a factor between (T - 1) / T and T / (T - 1): within
3 % at the release's 31 latent frames.)
"""

import torch
from tensordict import TensorDict
from torch import Tensor

from rcmfn.condition import TEXT, Condition

FIRST_FRAME, USE_IMAGE = "first_frame", "use_image"
TIMESTEP_SCALE = 1000.0  # the Wan net's timestep is 1000 r (SPEC-models §1)


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


def first_frame_condition(text: Tensor, first_frame: Tensor, use_image: Tensor) -> Condition:
    """The TI2V condition of a batch: text [B, L, D], the image's latent frame [B, C, 1, H, W] (the first
    latent frame of the video: the Wan2.2 VAE encodes the first pixel frame alone), and per sample
    whether to condition on it, `use_image` [B] bool (False: text-to-video; its first frame is ignored)."""
    B = text.shape[0]
    if first_frame.dim() != 5 or first_frame.shape[0] != B or first_frame.shape[2] != 1:
        raise ValueError(f"first frame latent must be [{B}, C, 1, H, W]; got {tuple(first_frame.shape)}")
    if use_image.shape != (B,):
        raise ValueError(f"use_image must be [{B}]; got {tuple(use_image.shape)}")
    entries = {TEXT: text, FIRST_FRAME: first_frame, USE_IMAGE: use_image.to(torch.bool)}
    return TensorDict(entries, batch_size=[B])


def random_condition(cfg, text: Tensor, latent_shape, generator: torch.Generator) -> Condition:
    """A random TI2V condition at a [C, T, H, W] latent (benchmarks): N(0, 1) first frame, every sample
    image-conditioned (the mode that adds per-token timesteps)."""
    C, _, H, W = latent_shape
    B, device = text.shape[0], text.device
    frame = torch.randn(B, C, 1, H, W, generator=generator, device=device).to(text.dtype)
    return first_frame_condition(text, frame, torch.ones(B, dtype=torch.bool, device=device))


def first_frame_forward(forward, x: Tensor, timestep: Tensor, cond, patch_size: tuple[int, int, int]) -> Tensor:
    """The Wan net's velocity for a `first_frame_condition` (WanModel.forward hands it here): the release's
    image-to-video input for the samples that use the image (first frame replaced, 0 as its tokens'
    timestep), and the image's exact velocity on their first frame (module docstring); text-to-video for
    the others. `forward(x, timestep, text)` is the plain net; `timestep` its [B] (1000 r)."""
    if patch_size[0] != 1:
        raise ValueError(f"TI2V's first-frame tokens need patch_t = 1; got patch {patch_size}")
    first, use = cond[FIRST_FRAME], cond[USE_IMAGE]
    if first.shape != (*x.shape[:2], 1, *x.shape[3:]):
        raise ValueError(f"first frame latent must be {[*x.shape[:2], 1, *x.shape[3:]]}; got {list(first.shape)}")
    if timestep.dim() != 1:
        raise ValueError(f"an image-conditioned call takes one timestep per sample [B]; got {list(timestep.shape)}")
    pick = use.view(-1, 1, 1, 1, 1)
    given = torch.where(pick, first.to(x.dtype), x[:, :, :1])
    grid = tuple(n // p for n, p in zip(x.shape[2:], patch_size, strict=True))
    clean = first_frame_timesteps(timestep, grid)  # 0 on the first frame's tokens, t elsewhere
    timesteps = torch.where(use[:, None], clean, timestep[:, None].expand_as(clean))
    v = forward(torch.cat([given, x[:, :, 1:]], dim=2), timesteps, cond[TEXT])
    r = (timestep.to(v.dtype) / TIMESTEP_SCALE).clamp_min(torch.finfo(v.dtype).tiny).view(-1, 1, 1, 1, 1)
    exact = (x[:, :, :1].to(v.dtype) - first.to(v.dtype)) / r  # the image's velocity: x_r - r v = image
    return torch.cat([torch.where(pick, exact, v[:, :, :1]), v[:, :, 1:]], dim=2)
