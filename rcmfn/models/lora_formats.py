"""LoRA adapters of a student in the key layouts other tools load: rcmfn's own, diffusers (peft), ComfyUI.

rcmfn's convention (shared with rcmfn/lora.py): for an adapted 2-D weight with our state-dict name K, the
entries `K.lora_down` [rank, in] and `K.lora_up` [out, rank], and W' = W + (alpha / rank) lora_up @ lora_down;
an optional scalar `K.alpha` entry overrides the adapter-wide alpha for that weight.

diffusers: `WanPipeline.load_lora_weights` / `load_lora_adapter` take peft names,
`transformer.<diffusers module>.lora_A.weight` (= down) and `.lora_B.weight` (= up). A file without alphas
gets lora_alpha = rank, scale 1 (diffusers src/diffusers/utils/peft_utils.py `get_peft_kwargs`), so the
scale alpha / rank is folded into lora_B here.
ComfyUI: the "generic lora format" of comfy/lora.py `model_lora_keys_unet` (Comfy-Org/ComfyUI @17358c8):
`<state-dict name without .weight>.lora_up.weight` / `.lora_down.weight` / `.alpha`, the state-dict name
being `diffusion_model.` + the release name (Family.comfyui_name); comfy/lora.py `load_lora` reads those
three entries, and comfy/weight_adapter/lora.py `calculate_weight` (L248-283 at Comfy-Org/ComfyUI ee71d5c)
applies strength * (alpha / lora_down.shape[0]) * lora_up @ lora_down, the same scale as rcmfn's.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import Tensor

from rcmfn.atomic import write_atomically
from rcmfn.models.family import ModelSpec

DOWN, UP, ALPHA = ".lora_down", ".lora_up", ".alpha"


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight: W' = W + scale * up @ down with scale = alpha / rank."""

    down: Tensor
    """[rank, in]"""
    up: Tensor
    """[out, rank]"""
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """(alpha / rank) up @ down in float64."""
        return self.scale * (self.up.double() @ self.down.double())


def parse_adapter(adapter: Mapping[str, Tensor], alpha: float | None = None) -> dict[str, LoraFactors]:
    """Our weight name -> factors, from rcmfn's adapter dict; `alpha` None means alpha = rank (scale 1).

    Every down needs its up and the reverse, both 2-D with one rank; anything else is named in the error.
    """
    targets: dict[str, LoraFactors] = {}
    names = set(adapter)
    unknown = sorted(n for n in names if not n.endswith((DOWN, UP, ALPHA)))
    if unknown:
        raise ValueError(
            f"adapter entries must end in {DOWN}, {UP} or {ALPHA}; got {unknown[:10]} (tensors trained in full "
            "by --lora-full have no place in a LoRA file: use the run's merged export, student_ema.*)"
        )
    for name in sorted(n[: -len(DOWN)] for n in names if n.endswith(DOWN)):
        if name + UP not in names:
            raise ValueError(f"adapter has {name}{DOWN} but no {name}{UP}")
        down, up = adapter[name + DOWN], adapter[name + UP]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{name}: lora_down must be [rank, in] and lora_up [out, rank] with one rank; "
                f"got {tuple(down.shape)} and {tuple(up.shape)}"
            )
        own = adapter.get(name + ALPHA)
        value = float(own) if own is not None else (float(down.shape[0]) if alpha is None else float(alpha))
        targets[name] = LoraFactors(down, up, value)
    orphans = sorted(n for n in names if n.endswith((UP, ALPHA)) and n.rsplit(".", 1)[0] not in targets)
    if orphans:
        raise ValueError(f"adapter entries without their {DOWN}: {orphans[:10]}")
    return targets


def check_targets(targets: Mapping[str, LoraFactors], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every target is a weight of the network (`shapes`: our names -> shapes) with the delta's shape."""
    unknown = sorted(n for n in targets if n not in shapes)
    if unknown:
        raise KeyError(f"adapter targets weights the network does not have: {unknown[:10]}")
    for name, f in targets.items():
        if tuple(shapes[name]) != (f.up.shape[0], f.down.shape[1]):
            delta = (f.up.shape[0], f.down.shape[1])
            raise ValueError(f"{name}: adapter delta is {delta}, weight {tuple(shapes[name])}")


def merge_adapter(params: Mapping[str, Tensor], targets: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    """`params` with every target weight W replaced by W + delta (computed in float64, cast back)."""
    check_targets(targets, {n: tuple(t.shape) for n, t in params.items()})
    merged = dict(params)
    for name, factors in targets.items():
        merged[name] = (params[name].double() + factors.delta()).to(params[name].dtype)
    return merged


def _module(name: str) -> str:
    if not name.endswith(".weight"):
        raise ValueError(f"a LoRA adapts a weight; {name!r} is not one")
    return name[: -len(".weight")]


def to_ours(spec: ModelSpec, targets: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    """rcmfn's own layout, with each target's alpha written out (`K.alpha`)."""
    del spec
    out: dict[str, Tensor] = {}
    for name, f in targets.items():
        out |= {
            name + DOWN: f.down.contiguous(),
            name + UP: f.up.contiguous(),
            name + ALPHA: torch.tensor(f.alpha, dtype=torch.float32),
        }
    return out


def to_diffusers(spec: ModelSpec, targets: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    """peft names under `transformer.` in the diffusers layout, alpha / rank folded into lora_B."""
    key_map = spec.key_maps["diffusers"]
    out: dict[str, Tensor] = {}
    for name, f in targets.items():
        if key_map.shape_from_ours and key_map.shape_from_ours(name, (f.up.shape[0], f.down.shape[1])):
            raise ValueError(f"{name} is stored reshaped in the diffusers layout; a LoRA cannot adapt it")
        module = "transformer." + _module(key_map.from_ours(name))
        out[module + ".lora_A.weight"] = f.down.contiguous()
        out[module + ".lora_B.weight"] = (f.up.double() * f.scale).to(f.up.dtype).contiguous()
    return out


def to_comfyui(spec: ModelSpec, targets: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    """ComfyUI's generic names: `diffusion_model.<release name>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    if spec.family.comfyui_name is None:
        raise ValueError(f"the {spec.family.name} family has no ComfyUI naming")
    out: dict[str, Tensor] = {}
    for name, f in targets.items():
        module = _module(spec.family.comfyui_name(name))
        out[module + ".lora_down.weight"] = f.down.contiguous()
        out[module + ".lora_up.weight"] = f.up.contiguous()
        out[module + ".alpha"] = torch.tensor(f.alpha, dtype=torch.float32)
    return out


LORA_FORMATS: dict[str, Callable[[ModelSpec, Mapping[str, LoraFactors]], dict[str, Tensor]]] = {
    "ours": to_ours,
    "diffusers": to_diffusers,
    "comfyui": to_comfyui,
}
"""Every LoRA file layout by name (convert's --lora-format)."""


def write_lora(
    spec: ModelSpec, targets: Mapping[str, LoraFactors], path: str | os.PathLike, layout: str, **metadata: str
) -> dict[str, Tensor]:
    """Write `targets` as one .safetensors file in `layout` (a key of LORA_FORMATS), atomically."""
    if layout not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA layout {layout!r}; valid: {sorted(LORA_FORMATS)}")
    tensors = LORA_FORMATS[layout](spec, targets)
    info = {"format": "pt", "lora_format": layout, **metadata}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=info))
    return tensors
