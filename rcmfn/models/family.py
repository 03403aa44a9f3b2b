"""A model family: what rcmfn needs to know about one architecture's conventions, as one value.

torchtitan's ModelSpec pattern without its registry machinery: each family folder (rcmfn/models/wan,
rcmfn/models/cosmos) defines one `Family`, and every network in rcmfn/models/registry.py is a `ModelSpec`
= a family + a config + its data shapes. Code outside rcmfn/models/ asks the spec (`spec.tokens(...)`,
`spec.velocity_net(module)`, ...) and never branches on which family it holds
(tests/rcmfn/models/test_family.py checks that). Adding a family = one folder + one registry entry.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rcmfn.models.checkpoint import KeyMap
from rcmfn.precond import TIME_SCALE
from rcmfn.switch import ExpertSwitch


@dataclass(frozen=True, eq=False)
class Family:
    """One architecture's conventions; every callable takes the family's frozen config dataclass."""

    name: str
    """Short name for messages and manifests ("wan", "cosmos")."""
    build: Callable[..., nn.Module]
    """build(config, **options) -> module; call it under torch.device("meta") to skip initialisation."""
    key_maps: Callable[[Any], Mapping[str, KeyMap]]
    """config -> checkpoint layouts by name; "official" (the release) first, e.g. also "diffusers"."""
    channels: Callable[[Any], int]
    """config -> latent channels the net takes (the noisy latent only, no condition channels)."""
    patch: Callable[[Any], tuple[int, int, int]]
    """config -> (t, h, w) patch size: one token per patch of the latent."""
    cp_axes: int
    """How many trailing latent axes the tokens that context parallelism cuts come from: Wan cuts all
    T'H'W' tokens (3), Cosmos the H'W' tokens of each latent frame (2; its blocks hold [B, T', S, D])."""
    depth_field: str
    """Name of the config field that counts the blocks (cut it to benchmark a few blocks)."""
    velocity: Callable[[nn.Module], Callable]
    """module -> net(params, x, timestep, context): functional_call with the family's own time input."""
    timestep_scale: float
    """The net's timestep input is timestep_scale * r for rectified-flow time r (SPEC-models §1)."""
    random_init: Callable[[nn.Module, torch.Generator], nn.Module]
    """(module, generator) -> module with random weights drawn from `generator`, for benchmarks and
    random-init runs (Wan: its own init as built, which draws from torch's global generator)."""
    flops: Callable[[Any, int, int], tuple[float, float]]
    """(config, tokens, text tokens) -> (linear FLOPs, attention FLOPs) of one forward of one sample."""
    random_condition: Callable[[Any, torch.Tensor, tuple[int, ...], torch.Generator], Any] | None = None
    """(config, text [B, L, D], latent shape (C, T, H, W), generator) -> a random sample's condition for
    benchmarks and smoke runs, where the net reads more than the text (rcmfn.condition; Wan I2V's image
    condition); None: the text itself."""
    image_condition: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None
    """Image-to-video families: (text [B, L, D], CLIP image states [B, N, Dimg], VAE latent of the video
    [first frame, zero frames...] [B, C, T, H, W]) -> the condition (rcmfn.condition); prepare and sample
    build it from an image (rcmfn.image_encoder). None: the condition is the text."""
    latent_condition: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None
    """Families conditioned on part of the clean latent itself (Wan2.2 TI2V: its first frame, the image):
    (text [B, L, D], the latent's first frame [B, C, 1, H, W], use [B] bool) -> the condition; distill
    draws `use` per sample (--image-fraction), sample sets it from --image. None: no such mode."""
    negative_prompt: str | None = None
    """The teacher's unconditional text when the user gives none: this prompt's encoding (Wan's default
    negative prompt), or None for an all-zero text embedding (Cosmos; registry.unconditional_prompt)."""
    diffusers_config: Callable[[Any], tuple[str, dict]] | None = None
    """config -> (diffusers transformer class name, its `from_pretrained` config.json entries), for
    exports diffusers loads as they are (rcmfn/models/diffusers_folder.py); None: no diffusers class."""
    comfyui_name: Callable[[str], str] | None = None
    """our tensor name -> ComfyUI's state-dict name of that tensor (`diffusion_model.` + the release's
    name), for LoRA files ComfyUI loads (rcmfn/models/lora_formats.py); None: no ComfyUI naming."""
    lora_targets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """LoRA target name (rcmfn.lora.TARGETS) -> fnmatch patterns of the state-dict weight keys it adapts."""


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """One network: its family, architecture and data shapes."""

    family: Family
    """The architecture's conventions (see `Family`)."""
    config: object
    """Frozen architecture dataclass passed to `build`."""
    latent_shape: tuple[int, int, int, int]
    """(C, T, H, W) of one latent at the default training resolution (prepare's and sample's default size)."""
    text_len: int
    """Text tokens per sample fed to cross-attention (zero-padded)."""
    text_dim: int
    """Width of the text-encoder states the net takes."""
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    """(time, height, width) compression of the family's VAE: the Wan2.1 VAE's (4, 8, 8), which Wan2.1 and
    Cosmos-Predict2 use (SPEC-models §3.4, §4); the Wan2.2 VAE's (4, 16, 16) for Wan2.2 TI2V-5B
    (Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py:17)."""
    experts: ExpertSwitch | None = None
    """A two-expert model (Wan2.2 A14B): two networks of `config`, a high-noise and a low-noise one,
    switched at this boundary with their own sampler guidance (rcmfn/switch.py); every other property
    describes one expert. Checkpoints hold one folder per expert (rcmfn/models/experts.py). None: one net."""

    @property
    def build(self) -> Callable[..., nn.Module]:
        return self.family.build

    @property
    def key_maps(self) -> Mapping[str, KeyMap]:
        return self.family.key_maps(self.config)

    @property
    def timestep_scale(self) -> float:
        return self.family.timestep_scale

    @property
    def negative_prompt(self) -> str | None:
        return self.family.negative_prompt

    @property
    def lora_targets(self) -> Mapping[str, tuple[str, ...]]:
        return self.family.lora_targets

    @property
    def channels(self) -> int:
        return self.family.channels(self.config)

    @property
    def depth(self) -> int:
        return getattr(self.config, self.family.depth_field)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) in pixels of `latent_shape` through the spec's VAE (the first frame
        kept, then `vae_stride`; SPEC-models §3.4, §4): 1 + 4 (T - 1) frames of 8 H x 8 W for Wan2.1's."""
        (_, T, H, W), (s_t, s_h, s_w) = self.latent_shape, self.vae_stride
        return 1 + s_t * (T - 1), s_h * H, s_w * W

    def tokens(self, latent_shape: tuple[int, ...] | None = None) -> int:
        """Tokens of one sample of a [C, T, H, W] latent (default: `latent_shape`): T H W over the patch."""
        grid = (latent_shape or self.latent_shape)[1:]
        return math.prod(n // p for n, p in zip(grid, self.family.patch(self.config), strict=True))

    def cp_tokens(self, latent_shape: tuple[int, ...]) -> int:
        """The token count that context parallelism cuts (see `Family.cp_axes`)."""
        axes = self.family.cp_axes
        grid, patch = latent_shape[-axes:], self.family.patch(self.config)[-axes:]
        return math.prod(n // p for n, p in zip(grid, patch, strict=True))

    def with_blocks(self, blocks: int) -> "ModelSpec":
        """This spec cut (or grown) to `blocks` blocks: for benchmarks and tests of a few real-width blocks."""
        config = dataclasses.replace(self.config, **{self.family.depth_field: blocks})
        return dataclasses.replace(self, config=config)

    def velocity_net(self, module: nn.Module) -> Callable:
        """rcmfn's raw velocity net(params, x_in, c_noise = 1000 r, cond) over `module`: the one time-input
        adapter (Wan takes 1000 r, Cosmos r; SPEC-models §1, rcmfn.precond.TIME_SCALE)."""
        base, scale = self.family.velocity(module), self.timestep_scale / TIME_SCALE
        if scale == 1.0:
            return base
        return lambda params, x, c_noise, cond: base(params, x, c_noise * scale, cond)

    def diffusers_config(self) -> tuple[str, dict]:
        """(diffusers class name, config entries) of this network; ValueError if the family has none."""
        if self.family.diffusers_config is None:
            raise ValueError(f"the {self.family.name} family has no diffusers transformer class to export to")
        return self.family.diffusers_config(self.config)

    def random_condition(self, text: torch.Tensor, generator: torch.Generator, latent_shape=None):
        """The condition net(params, x, t, cond) takes for `text` [B, L, D], with random extras where the
        family has them (`Family.random_condition`), at `latent_shape` (default: the spec's)."""
        make = self.family.random_condition
        return text if make is None else make(self.config, text, latent_shape or self.latent_shape, generator)

    def random_init(self, module: nn.Module, generator: torch.Generator) -> nn.Module:
        return self.family.random_init(module, generator)

    def flops(self, tokens: int | None = None) -> tuple[float, float]:
        """(linear, attention) FLOPs of one forward of one sample at `tokens` (default: the spec's shape)."""
        return self.family.flops(self.config, self.tokens() if tokens is None else tokens, self.text_len)
