"""Tiny students with poisoned random weights and diffusers' own forward, shared by the export tests.

diffusers' Cosmos transformer needs torchvision only to resize the padding mask; a nearest-interpolation
stand-in replaces it (as tests/rcmfn/models/test_cosmos.py does) instead of installing torchvision.
"""

import contextlib
import types
from dataclasses import replace

import torch
import torch.nn.functional as F

from ops.attention.reference import attention_reference
from rcmfn.models.registry import get_spec

F32 = torch.float32


def poisoned(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter N(0, 0.3^2), 1-D weights + 1: no zero or default init hides a missing tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.named_parameters():
        value = 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        out[name] = (value + (1.0 if p.dim() == 1 and name.endswith("weight") else 0.0)).to(F32)
    return out


def wan_spec():
    return get_spec("wan-tiny")


def cosmos_spec(qk_norm_eps: float = 1e-5, video: bool = False):
    """cosmos-tiny with diffusers' fixed q/k RMSNorm eps (1e-5), so the two nets are the same function."""
    spec = get_spec("cosmos-tiny")
    config = replace(spec.config, qk_norm_eps=qk_norm_eps)
    if video:
        config = replace(config, condition_mask=True, rope_extrapolation=(20.0 / 24.0, 2.0, 2.0))
    return replace(spec, config=config)


def our_module(spec):
    """The network of `spec` on meta, with the float32 sinusoid diffusers uses (Wan) and reference attention."""
    options = {"sinusoid_dtype": F32, "attention_fn": attention_reference} if spec.family.name == "wan" else {}
    with torch.device("meta"):
        return spec.build(spec.config, **options)


def inputs(spec, batch=2, frames=2, height=4, width=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.channels, frames, height, width, generator=g)
    context = torch.randn(batch, 5, spec.text_dim, generator=g)
    return x, torch.rand(batch, generator=g), context


@contextlib.contextmanager
def cosmos_without_torchvision():
    import diffusers.models.transformers.transformer_cosmos as transformer_cosmos

    stand_in = types.SimpleNamespace(
        functional=types.SimpleNamespace(
            resize=lambda x, size, interpolation: F.interpolate(x, size=size, mode=interpolation)
        ),
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
    )
    saved = getattr(transformer_cosmos, "transforms", None)
    transformer_cosmos.transforms = stand_in
    try:
        yield
    finally:
        transformer_cosmos.transforms = saved


def ours_forward(spec, params, x, r, context):
    """Our velocity at rectified-flow time r (the net's own time input: Wan 1000 r, Cosmos r)."""
    module = our_module(spec)
    kwargs = {}
    if getattr(spec.config, "condition_mask", False):
        kwargs["condition_mask"] = torch.zeros(x.shape[0], 1, *x.shape[2:])
    with torch.no_grad():
        return torch.func.functional_call(module, params, (x, spec.timestep_scale * r, context), kwargs)


def diffusers_forward(spec, net, x, r, context):
    """diffusers' velocity at rectified-flow time r, called as its pipelines call it."""
    kwargs = {}
    if spec.family.name == "cosmos":
        kwargs["padding_mask"] = torch.zeros(1, 1, 8 * x.shape[-2], 8 * x.shape[-1])
        if getattr(spec.config, "condition_mask", False):
            kwargs["condition_mask"] = torch.zeros(x.shape[0], 1, *x.shape[2:])
    with torch.no_grad(), cosmos_without_torchvision():
        return net(x, spec.timestep_scale * r, context, return_dict=False, **kwargs)[0]


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / (1 + |ref|), the SPEC-models §5 criterion."""
    return ((ours.double() - ref.double()).abs() / (1.0 + ref.double().abs())).max().item()
