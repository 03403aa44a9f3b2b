"""The image condition of image-to-video models (Wan2.1 I2V) in prepare and sample, for any family that
has one (`Family.image_condition`); text-only families get None and nothing changes for them."""

from pathlib import Path

import torch

from rcmfn import media
from rcmfn.codecs import load_vae
from rcmfn.condition import TEXT, Condition, with_text
from rcmfn.image_encoder import image_conditioner, load_image_encoder
from rcmfn.models.registry import ModelSpec


def image_condition_of(spec: ModelSpec, image_encoder: Path | None, vae, frames: int, device):
    """condition(text [B, L, D], first frames [B, 3, H, W] in [-1, 1]) for an image-conditioned `spec`,
    or None for a text-only one. The image encoder is required exactly for the former."""
    make = spec.family.image_condition
    if make is None:
        if image_encoder is not None:
            raise ValueError(f"--image-encoder given, but {spec.family.name} nets take no image condition")
        return None
    if image_encoder is None:
        raise ValueError(f"{spec.family.name} nets are conditioned on an image: pass --image-encoder (CLIP folder)")
    return image_conditioner(make, load_image_encoder(image_encoder, device), vae, frames)


def extras(cond: Condition) -> dict[str, torch.Tensor]:
    """The condition's entries other than the text (what shards store per sample), without the batch axis."""
    return {} if isinstance(cond, torch.Tensor) else {k: v[0] for k, v in cond.items() if k != TEXT}


def stored_conditions(condition_of, text_dim: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the per-sample condition tensors the shards store ({} for a text-only model), from one
    condition of a blank image."""
    if condition_of is None:
        return {}
    probe = extras(condition_of(torch.zeros(1, 1, text_dim), torch.zeros(1, 3, height, width)))
    return {name: tuple(tensor.shape) for name, tensor in probe.items()}


def sample_condition(condition_of, text: torch.Tensor, pixels: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """One sample's stored condition tensors: text [L, D], pixels [3, F, H, W] whose frame 0 is the image."""
    return None if condition_of is None else extras(condition_of(text[None].float(), pixels[None, :, 0]))


def sampling_conditions(spec: ModelSpec, cfg, texts: torch.Tensor, shape, device) -> Condition:
    """The conditions of sample's jobs: `texts` [J, L, D] for a text-only model; for an image-to-video one
    the condition of `cfg.image` (fitted to the sample size by centre crop, encoded once) beside each text.
    `cfg` is entrypoints.sample's SampleConfig; `shape` the latent (C, T, H, W)."""
    if spec.family.image_condition is None:
        if cfg.image is not None:
            raise ValueError(f"--image given, but {spec.family.name} nets take no image condition")
        return texts
    if cfg.image is None or cfg.vae is None:
        raise ValueError(f"{spec.family.name} nets are conditioned on an image: pass --image and --vae")
    frames, height, width = 1 + 4 * (shape[1] - 1), 8 * shape[2], 8 * shape[3]
    vae = load_vae(cfg.vae, device)
    condition_of = image_condition_of(spec, cfg.image_encoder, vae, frames, device)
    image = media.fit_frames(media.read_image(cfg.image), 1, height, width, "crop", source=str(cfg.image))
    one = condition_of(texts[:1].to(device), media.to_pixels(image)[None, :, 0].to(device)).cpu()
    return with_text(one.expand(texts.shape[0]), texts)
