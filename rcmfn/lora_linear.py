"""How a network computes with an adapter set (rcmfn/lora.py): the low-rank path beside each frozen linear.

y = x W^T + b + (alpha / rank) (x down^T) up^T, never W + delta: a merged weight per adapted layer is a
new full-size tensor that autograd keeps for the backward wherever the layer's input carries gradient
(saved for the input gradient; also under the mm_only activation-checkpointing policy, which saves the
up @ down product), i.e. a second copy of nearly every adapted weight for the whole step. Wan 14B: per
block the self-attention q/k/v/o, cross-attention q/o and FFN weights, 6 D^2 + 2 D F = 0.30e9, 12e9 over
40 blocks, ~24 GB in bf16; full activation checkpointing bounds that to one block but recomputes every
merge. Either way each merge also builds a full-size weight gradient before it reaches the adapters.
The low-rank path saves only x down^T ([tokens, rank]) beside the input the frozen linear saves anyway,
and its weight gradients are rank-sized (tests/rcmfn/test_lora.py counts the saved bytes of both). The
tangent of the sCM loss (w.r.t. x and t) flows through both terms like any linear.

`attach_adapters` swaps each adapted `nn.Linear` of a module for a `LoraLinear` holding the same weight
and bias objects plus `lora_down` / `lora_up` parameters, so the module stays an ordinary module:
`functional_call` over {frozen weights} | {adapters under their module names} computes the adapted
net, FSDP2 shards the adapters like any parameter, and activation checkpointing and compile wrap the
blocks unchanged. A model that reads a linear's weight instead of calling it (a time or modulation
MLP evaluated in float32) reads `linear_weight(layer)`, the merged weight of that (small) layer.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rcmfn.lora import DOWN, UP, adapted_keys, is_low_rank, lora_delta

WEIGHT = ".weight"


class LoraLinear(nn.Module):
    """A frozen linear plus its low-rank path; the weight (and bias) are the wrapped layer's own objects."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.in_features, self.out_features, self.scale = base.in_features, base.out_features, scale
        self.weight = base.weight
        self.bias = base.bias
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_down = nn.Parameter(torch.zeros(rank, base.in_features, **like))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, **like))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + self.scale * low


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The weight `layer` computes with: its own, or W + (alpha / rank) up @ down for a `LoraLinear`."""
    if isinstance(layer, LoraLinear):
        wide = torch.promote_types(layer.weight.dtype, layer.lora_down.dtype)
        delta = lora_delta(layer.lora_down.to(wide), layer.lora_up.to(wide), layer.scale)
        return (layer.weight.to(wide) + delta).to(layer.weight.dtype)
    return layer.weight


def module_name(adapter_key: str) -> str:
    """The parameter name in an adapted module of a convention key: "a.q.weight.lora_down" -> "a.q.lora_down"."""
    for suffix in (DOWN, UP):
        if adapter_key.endswith(WEIGHT + suffix):
            return adapter_key[: -len(WEIGHT + suffix)] + suffix
    raise ValueError(f"adapter key {adapter_key!r} is not '<weight key ending in .weight>{DOWN}' or '...{UP}'")


def adapter_key(name: str) -> str:
    """The inverse of `module_name`: "a.q.lora_down" -> "a.q.weight.lora_down"."""
    for suffix in (DOWN, UP):
        if name.endswith(suffix):
            return name[: -len(suffix)] + WEIGHT + suffix
    raise ValueError(f"{name!r} is not an adapter parameter (ends in neither {DOWN!r} nor {UP!r})")


is_adapter = is_low_rank
"""Whether a module's parameter name is an adapter's (it ends like the convention's keys)."""


def attach_adapters(module: nn.Module, keys: Sequence[str], rank: int, scale: float) -> nn.Module:
    """Swap the linear owning each weight key in `keys` for a `LoraLinear` (in place; returned).

    The new adapter parameters are zeros on the weight's device (meta stays meta): the caller fills
    them (functional_call arguments, or a state dict). ValueError for a key that is not a linear's weight.
    """
    for key in keys:
        if not key.endswith(WEIGHT):
            raise ValueError(f"lora target {key!r} is not a weight key")
        parent_name, _, child = key[: -len(WEIGHT)].rpartition(".")
        parent = module.get_submodule(parent_name)
        layer = getattr(parent, child, None)
        if type(layer) is not nn.Linear:
            raise ValueError(f"lora target {key!r} belongs to {type(layer).__name__}, not an nn.Linear")
        setattr(parent, child, LoraLinear(layer, rank, scale))
    return module


def with_adapters(frozen: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor]) -> dict:
    """functional_call's parameters of an adapted module: the frozen weights, the adapters renamed, and the
    set's tensors trained in full (rcmfn.lora.LoraConfig.full) in place of their frozen ones."""
    return dict(frozen.items()) | {module_name(k) if is_low_rank(k) else k: v for k, v in adapters.items()}


def lora_denoiser(denoise, frozen: Mapping[str, torch.Tensor]):
    """denoise'(adapters, x_t, t, cond) = denoise(frozen weights + adapters, x_t, t, cond): the adapted
    network as the loop's denoiser over an adapter set (`denoise` over a module with adapters attached)."""

    def adapted(adapters, x_t, t, cond):
        return denoise(with_adapters(frozen, adapters), x_t, t, cond)

    return adapted


def adapt_module(module: nn.Module, patterns: Mapping[str, Sequence[str]], cfg) -> list[str]:
    """Attach `cfg`'s (rcmfn.lora.LoraConfig) adapters to `module` in place; return the adapted weight keys.

    `patterns`: the architecture's target -> key patterns (`ModelSpec.lora_targets`). Checks the
    targets and the rank against the module's weights (rcmfn.lora.adapted_keys) before changing anything.
    """
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    keys = adapted_keys(shapes, patterns, cfg.targets, cfg.rank)
    attach_adapters(module, keys, cfg.rank, cfg.scale)
    return keys
