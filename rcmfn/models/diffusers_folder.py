"""A student as a folder diffusers loads as it is: `<TransformerClass>.from_pretrained(folder)`.

The layout of a diffusers model folder (diffusers `ModelMixin.save_pretrained`): config.json with
`_class_name` and `_diffusers_version`, then the weights as `diffusion_pytorch_model.safetensors`, or when
they exceed one shard as `diffusion_pytorch_model-0000k-of-0000n.safetensors` plus
`diffusion_pytorch_model.safetensors.index.json` mapping each tensor to its shard. Names and shapes are the
family's diffusers key layout; the config is derived from rcmfn's config dataclass (Family.diffusers_config).
The folder is written beside its final name and renamed into place (rcmfn/atomic.py).
"""

import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from rcmfn.atomic import write_folder_atomically
from rcmfn.models.checkpoint import layout_tensors
from rcmfn.models.family import ModelSpec

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # diffusers' save_pretrained default max_shard_size "5GB"
MIN_DIFFUSERS_VERSION = "0.35.0"  # the oldest diffusers rcmfn's dev extra accepts


def shard_names(count: int) -> list[str]:
    """diffusers' shard file names for `count` shards (a single shard keeps the plain name)."""
    if count == 1:
        return [WEIGHTS_NAME]
    stem, ext = WEIGHTS_NAME.rsplit(".", 1)
    return [f"{stem}-{k:05d}-of-{count:05d}.{ext}" for k in range(1, count + 1)]


def plan_shards(tensors: Mapping[str, Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut greedily into shards of at most `max_bytes` (a larger tensor alone)."""
    if max_bytes < 1:
        raise ValueError(f"shard size must be >= 1 byte; got {max_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return MIN_DIFFUSERS_VERSION


def write_diffusers_folder(
    spec: ModelSpec,
    params: Mapping[str, Tensor],
    folder: str | Path,
    card: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write our-named `params` of `spec`'s network as a diffusers model folder (README.md = `card`)."""
    class_name, config = spec.diffusers_config()
    tensors = layout_tensors(params, spec.key_maps["diffusers"])
    shards = plan_shards(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    config_json = {"_class_name": class_name, "_diffusers_version": diffusers_version(), **config}

    def write(tmp: Path) -> None:
        for file, keys in zip(names, shards, strict=True):
            save_file({k: tensors[k] for k in keys}, str(tmp / file), metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map = {k: file for file, keys in zip(names, shards, strict=True) for k in keys}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")

    return write_folder_atomically(folder, write)
