"""The CLIP image encoder of Wan2.1 I2V (ViT-H/14) through transformers, local weights only.

The official code encodes the input image with open-clip XLM-RoBERTa-Large ViT-H/14 and keeps the output
of 31 of its 32 blocks (Wan-Video/Wan2.1 wan/modules/clip.py:527-542, `use_31_block=True`): resize to the
model's 224 x 224 (bicubic, align_corners False), [-1, 1] -> [0, 1], the CLIP mean/std normalisation
(clip.py:457-465). The "-Diffusers" I2V releases ship that vision tower as a transformers
CLIPVisionModel in image_encoder/; its hidden_states[-2] is the same penultimate-block output (diffusers'
WanImageToVideoPipeline.encode_image). Nothing here downloads (rcmfn.codecs's rules).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rcmfn.codecs import require, resolve_folder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # clip.py:457-458
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageEncoder:
    """A CLIP vision tower; `encode` gives the I2V net's image states [B, tokens, width]."""

    model: torch.nn.Module

    @property
    def size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def tokens(self) -> int:
        """Patches of the square input plus the class token (257 for ViT-H/14 at 224)."""
        return (self.size // int(self.model.config.patch_size)) ** 2 + 1

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> penultimate-block states [B, tokens, dim] float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1]; got {tuple(images.shape)}")
        weight = next(self.model.parameters())
        pixels = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean, std = (torch.tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        pixels = ((pixels.to(weight.device) * 0.5 + 0.5) - mean.to(weight.device)) / std.to(weight.device)
        out = self.model(pixel_values=pixels.to(weight.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float()


def load_image_encoder(
    path: str | os.PathLike | None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ImageEncoder:
    """The CLIPVisionModel in a local folder (an I2V release root with image_encoder/, or that folder)."""
    folder = resolve_folder(path, "image_encoder", "image encoder", "--image-encoder")
    transformers = require("transformers")
    model = transformers.CLIPVisionModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return ImageEncoder(model.to(device).eval())


def write_tiny_image_encoder(folder: str | os.PathLike, dim: int = 20, seed: int = 0) -> Path:
    """Save a tiny random CLIP vision tower as folder/image_encoder: 32 px, patch 16 -> 5 tokens of `dim`
    (the registry's wan-i2v-tiny net reads 5 tokens of 20); tests and offline demos only."""
    transformers = require("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    torch.manual_seed(seed)
    transformers.CLIPVisionModel(config).save_pretrained(Path(folder) / "image_encoder")
    return Path(folder)


def first_frame_video(image: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, frames, H, W]: the image, then zero frames (mid-grey in [-1, 1]); what the
    official I2V encodes with the VAE for its condition latent (wan/image2video.py:240-248)."""
    B, C, H, W = image.shape
    return torch.cat([image[:, :, None], image.new_zeros(B, C, frames - 1, H, W)], dim=2)


def image_conditioner(make, encoder: ImageEncoder, vae, frames: int):
    """condition(text [B, L, D], first frames [B, 3, H, W] in [-1, 1]) -> the family's condition, with
    `make` = Family.image_condition(text, image states, VAE latent of `first_frame_video`)."""

    def condition(text: torch.Tensor, first_frames: torch.Tensor):
        states = encoder.encode(first_frames).to(text.device, text.dtype)
        latent = vae.encode(first_frame_video(first_frames, frames)).to(text.device, text.dtype)
        return make(text, states, latent)

    return condition
