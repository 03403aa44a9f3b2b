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
    negative_prompt: str | None = None
    """The teacher's unconditional text when the user gives none: this prompt's encoding (Wan's default
    negative prompt), or None for an all-zero text embedding (Cosmos; registry.unconditional_prompt)."""
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
        """(frames, height, width) in pixels of `latent_shape` through the Wan2.1 VAE that both families
        use (stride 4 in time with the first frame kept, 8 in space; SPEC-models §3.4, §4):
        1 + 4 (T - 1) frames of 8 H x 8 W."""
        _, T, H, W = self.latent_shape
        return 1 + 4 * (T - 1), 8 * H, 8 * W

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

    def random_init(self, module: nn.Module, generator: torch.Generator) -> nn.Module:
        return self.family.random_init(module, generator)

    def flops(self, tokens: int | None = None) -> tuple[float, float]:
        """(linear, attention) FLOPs of one forward of one sample at `tokens` (default: the spec's shape)."""
        return self.family.flops(self.config, self.tokens() if tokens is None else tokens, self.text_len)
