"""The image condition of image-to-video models in prepare, sample and distill: Wan2.1 I2V's (CLIP states
and a first-frame latent, `Family.image_condition`) and Wan2.2 TI2V's (the latent's own first frame,
`Family.latent_condition`); text-only families get None and nothing changes for them."""

import math
from pathlib import Path

import torch

from entrypoints.presets import get_preset
from rcmfn import media
from rcmfn.codecs import load_vae
from rcmfn.condition import TEXT, Condition, make_condition, with_text
from rcmfn.image_encoder import image_conditioner, load_image_encoder
from rcmfn.models.registry import ModelSpec, get_spec


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
    if spec.family.latent_condition is not None and cfg.image is not None:
        return first_frame_conditions(spec, cfg, texts, shape, device)
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


def first_frame_conditions(spec: ModelSpec, cfg, texts: torch.Tensor, shape, device) -> Condition:
    """Image-to-video for a net whose condition is the latent's own first frame (Wan2.2 TI2V): `cfg.image`
    fitted to the sample size by centre crop and encoded alone (the causal VAE's first latent frame),
    beside each text; every job uses it. Without --image the same net samples text-to-video."""
    if cfg.vae is None:
        raise ValueError(f"--image needs --vae to encode it for {spec.family.name} nets")
    _, s_h, s_w = spec.vae_stride
    height, width = s_h * shape[2], s_w * shape[3]
    image = media.fit_frames(media.read_image(cfg.image), 1, height, width, "crop", source=str(cfg.image))
    frame = (
        load_vae(cfg.vae, device, stride=spec.vae_stride, channels=spec.channels)
        .encode(media.to_pixels(image)[None].to(device))
        .cpu()
    )
    if frame.shape != (1, shape[0], 1, *shape[2:]):
        want = [1, shape[0], 1, *shape[2:]]
        raise ValueError(f"the VAE encodes the image to {list(frame.shape)}; the net takes {want}")
    jobs = texts.shape[0]
    use = torch.ones(jobs, dtype=torch.bool)
    return spec.family.latent_condition(texts, frame.to(texts.dtype).expand(jobs, *frame.shape[1:]), use)


def training_condition(
    spec: ModelSpec, text: torch.Tensor, latents: torch.Tensor, stored: dict, image_fraction: float, generator
) -> Condition:
    """A training batch's condition: the text [B, L, D] with what the shards store beside it (`stored`, e.g.
    Wan I2V's image states); for a net conditioned on its latent's own first frame (Wan2.2 TI2V), each
    sample uses it with probability `image_fraction`, drawn from `generator` (nothing drawn at 0)."""
    if image_fraction <= 0:
        return make_condition(text, **stored)
    use = torch.rand(latents.shape[0], generator=generator, device=generator.device) < image_fraction
    return spec.family.latent_condition(text, latents[:, :, :1], use.to(text.device))


def image_fraction_of(cfg) -> float:
    """A distill config's (entrypoints.config) share of image-conditioned samples: --image-fraction or the
    preset's; ValueError for a share outside [0, 1] or a positive one for a model whose nets have no
    first-frame image mode."""
    value = get_preset(cfg.model).image_fraction if cfg.image_fraction is None else cfg.image_fraction
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"image_fraction must be in [0, 1]; got {value}")
    if value > 0 and cfg.model != "toy" and get_spec(cfg.model).family.latent_condition is None:
        raise ValueError(f"--image-fraction {value}: {cfg.model} nets have no first-frame image-to-video mode")
    return value
