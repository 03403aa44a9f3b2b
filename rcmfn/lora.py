"""Low-rank adapters (LoRA) on a frozen network's 2-D weights: the adapter set, its start, the merge.

Hu et al., "LoRA" (arXiv 2106.09685) §4.1: W' = W + (alpha / r) B A with A (r x in) random, B
(out x r) zero, so the adapted network starts as the frozen one.

The adapter-set convention (other code, e.g. LoRA export formats, reads it; keep it exactly): for each
adapted weight of the model's own state_dict key K (e.g. "blocks.0.self_attn.q.weight") the set holds
  K + ".lora_down"  [rank, in_features]   (A)
  K + ".lora_up"    [out_features, rank]  (B)
and the weight delta is (alpha / rank) lora_up @ lora_down. A set may also hold tensors trained in full
(`LoraConfig.full`: biases, the layers outside the blocks) under the model's own key K, each replacing the
frozen K. Which weights are adapted is named by
target ("attention", "ffn", "modulation"), resolved per architecture into key patterns by the model's
own code (`Family.lora_targets`, rcmfn.toy.tiny_dit.LORA_TARGETS). How a network computes with an
adapter set without merging every weight at once: rcmfn/lora_linear.py.
"""

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tensordict import TensorDict

DOWN, UP = ".lora_down", ".lora_up"
# Adapters train at ten times the full model's learning rates unless a run sets them (entrypoints.config):
# at the full rates a rank-8 toy student is still contracted after 600 sCM iterations (spread 0.46 at 2
# steps), at ten times it matches full fine-tuning (0.97 vs 1.16; docs/toy.md "LoRA"). A low-rank update
# moves the weights less per Adam step (delta = up @ down, up starting at zero).
LORA_LR_SCALE = 10.0
TARGETS = ("attention", "ffn", "modulation")
"""Every target name; an architecture maps each it has to state-dict key patterns."""
FULL_SCOPES = ("biases", "outside-blocks")
"""What `LoraConfig.full` may train in full beside the adapters: every bias, and every parameter outside
the transformer blocks (embeddings, positions, output head). Toy, rank 8, two seeds: with both, the LoRA
student matches full fine-tuning within the seed-to-seed margin; without, it puts the mode weights ~0.045
TV further off at one seed (docs/toy.md "LoRA")."""
BLOCK_PREFIX = "blocks."  # every rcmfn network names its transformer blocks blocks.N
# Tensors trained in full step at the full model's rate: 1 / LORA_LR_SCALE of the adapters' (the toy's
# 10x rate on its embeddings was unstable at one seed, docs/toy.md "What the gap is not").
FULL_LR_SCALE = 1.0 / LORA_LR_SCALE


@dataclass(frozen=True)
class LoraConfig:
    """Rank, scale and targets of the adapters; rank 0 = no adapters (full fine-tuning)."""

    rank: int = 0
    alpha: float | None = None
    """scale numerator: the delta is (alpha / rank) up @ down; None = rank (scale 1)"""
    targets: tuple[str, ...] = ("attention", "ffn")
    full: tuple[str, ...] = ()
    """parameters trained in full beside the adapters, from FULL_SCOPES"""

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora rank must be >= 0 (0 = full fine-tuning); got {self.rank}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora alpha must be finite and > 0; got {self.alpha}")
        if unknown := [t for t in self.targets if t not in TARGETS]:
            raise ValueError(f"unknown lora targets {unknown}; valid: {list(TARGETS)}")
        if unknown := [f for f in self.full if f not in FULL_SCOPES]:
            raise ValueError(f"unknown lora full-training scopes {unknown}; valid: {list(FULL_SCOPES)}")
        if self.full and self.rank == 0:
            raise ValueError(f"lora full-training scopes {list(self.full)} train beside adapters: need rank > 0")
        if self.rank > 0 and not self.targets:
            raise ValueError("lora rank > 0 needs at least one target")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


def adapted_keys(
    shapes: Mapping[str, Sequence[int]], patterns: Mapping[str, Sequence[str]], targets: Sequence[str], rank: int
) -> list[str]:
    """The weight keys of `shapes` (state-dict key -> shape) that `targets` adapt, in `shapes`' order.

    `patterns`: the architecture's target -> fnmatch patterns over its keys. Raises ValueError for a
    target the architecture does not have, one that matches no 2-D weight, and a rank above
    min(in_features, out_features) of any adapted weight (the delta could not reach that rank).
    """
    if missing := [t for t in targets if t not in patterns]:
        raise ValueError(f"lora targets {missing} do not exist for this network; it has {sorted(patterns)}")
    keys = []
    for target in targets:
        found = [k for k in shapes if any(fnmatch.fnmatchcase(k, p) for p in patterns[target])]
        found = [k for k in found if len(shapes[k]) == 2]
        if not found:
            raise ValueError(f"lora target {target!r} matches no 2-D weight (patterns {list(patterns[target])})")
        keys += [k for k in found if k not in keys]
    for key in keys:
        if rank > min(shapes[key]):
            shape = tuple(shapes[key])
            raise ValueError(f"lora rank {rank} exceeds min(out, in) = {min(shape)} of {key} {shape}")
    return [k for k in shapes if k in keys]


def fully_trained_keys(shapes: Mapping[str, Sequence[int]], scopes: Sequence[str], adapted: Sequence[str]) -> list[str]:
    """The keys of `shapes` that `scopes` (FULL_SCOPES) train in full, in `shapes`' order; never an adapted
    weight (`adapted`). ValueError for a scope that names no parameter."""
    picks = {
        "biases": lambda k: k.endswith(".bias"),
        "outside-blocks": lambda k: not k.startswith(BLOCK_PREFIX),
    }
    for scope in scopes:
        if not any(picks[scope](k) and k not in adapted for k in shapes):
            raise ValueError(f"lora full-training scope {scope!r} matches no parameter of this network")
    return [k for k in shapes if k not in adapted and any(picks[scope](k) for scope in scopes)]


def add_fully_trained(
    adapters: TensorDict, shapes: Mapping[str, Sequence[int]], weights: Mapping[str, torch.Tensor], cfg: LoraConfig
) -> TensorDict:
    """`adapters` (in place; returned) with a copy of each of `weights`' tensors that `cfg.full` trains in full:
    they start from the frozen network's values. `shapes`: the network's keys -> shapes."""
    adapted = list(adapter_pairs(adapters))
    for key in fully_trained_keys(shapes, cfg.full, adapted):
        adapters[key] = weights[key].detach().clone()
    return adapters


def is_low_rank(key: str) -> bool:
    """Whether an adapter-set key is a low-rank factor (else a tensor trained in full)."""
    return isinstance(key, str) and key.endswith((DOWN, UP))  # nested TensorDict keys are tuples


def optimizer_groups(params: Mapping[str, torch.Tensor]) -> list[dict]:
    """AdamW parameter groups of a trainable set: one group, or for an adapter set with tensors trained in
    full a second group for those at `lr_scale` FULL_LR_SCALE (the loop multiplies each group's rate)."""
    low = [v for k, v in params.items() if is_low_rank(k)]
    full = [v for k, v in params.items() if not is_low_rank(k)]
    if not low or not full:
        return [{"params": low + full, "lr_scale": 1.0}]
    return [{"params": low, "lr_scale": 1.0}, {"params": full, "lr_scale": FULL_LR_SCALE}]


def init_adapters(
    shapes: Mapping[str, Sequence[int]],
    keys: Sequence[str],
    rank: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> TensorDict:
    """A fresh adapter set for the weights `keys`: down ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's
    Kaiming-uniform bound, a = sqrt(5), as LoRA implementations start A), up = 0. Drawn in float64 on
    the CPU from `generator`, key by key in `keys`' order, then cast: the same set for any dtype."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1 to build adapters; got {rank}")
    adapters = {}
    for key in keys:
        out_features, in_features = shapes[key]
        bound = 1.0 / math.sqrt(in_features)
        down = torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * (2 * bound) - bound
        adapters[key + DOWN] = down.to(dtype)
        adapters[key + UP] = torch.zeros(out_features, rank, dtype=dtype)
    return TensorDict(adapters, batch_size=[])


def adapter_pairs(adapters: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{weight key K: (down, up)} of an adapter set; ValueError for a key outside the convention, a
    down without its up (or the reverse), or ranks that disagree."""
    pairs: dict[str, list] = {}
    for name, tensor in adapters.items():
        if not name.endswith((DOWN, UP)):
            raise ValueError(f"adapter key {name!r} ends in neither {DOWN!r} nor {UP!r}")
        base, is_up = (name[: -len(UP)], True) if name.endswith(UP) else (name[: -len(DOWN)], False)
        pairs.setdefault(base, [None, None])[int(is_up)] = tensor
    for key, (down, up) in pairs.items():
        if down is None or up is None:
            raise ValueError(f"adapter of {key} lacks its {DOWN if down is None else UP}")
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            shapes = f"down {tuple(down.shape)} and up {tuple(up.shape)}"
            raise ValueError(f"adapter of {key}: {shapes} are not [rank, in], [out, rank]")
    return {k: (d, u) for k, (d, u) in pairs.items()}


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """(alpha / rank) up @ down, in the adapters' dtype."""
    return scale * (up @ down)


def merge(
    weights: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """`weights` with every adapted weight W replaced by W + (alpha / rank) up @ down (alpha None = rank),
    and every tensor of the set trained in full in place of its frozen one.

    The delta is computed in promote(W, adapter) dtype and cast to W's. Raises ValueError for an
    adapter whose weight is missing or whose shapes do not fit it.
    """
    merged = dict(weights.items())
    for key, tensor in adapters.items():
        if not is_low_rank(key):  # trained in full: replaces the frozen tensor
            if key not in merged:
                raise ValueError(f"fully trained {key}: no such tensor in the network's state dict")
            if tuple(merged[key].shape) != tuple(tensor.shape):
                shapes = f"{tuple(tensor.shape)} does not fit the network's {tuple(merged[key].shape)}"
                raise ValueError(f"fully trained {key} {shapes}")
            merged[key] = tensor.to(merged[key].dtype)
    for key, (down, up) in adapter_pairs({k: v for k, v in adapters.items() if is_low_rank(k)}).items():
        if key not in merged:
            raise ValueError(f"adapter of {key}: no such weight in the network's state dict")
        weight = merged[key]
        if tuple(weight.shape) != (up.shape[0], down.shape[1]):
            raise ValueError(
                f"adapter of {key}: up {tuple(up.shape)} @ down {tuple(down.shape)} "
                f"does not fit the weight {tuple(weight.shape)}"
            )
        rank = down.shape[0]
        wide = torch.promote_types(weight.dtype, down.dtype)
        delta = lora_delta(down.to(wide), up.to(wide), 1.0 if alpha is None else alpha / rank)
        merged[key] = (weight.to(wide) + delta).to(weight.dtype)
    return merged
