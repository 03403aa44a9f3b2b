"""Checkpoint IO for every model: stream release files into a meta-built module, export safetensors.

SPEC-models §2.7, §3.5 (release formats); STYLE example 17 (key maps as data, strict loading).
"""

import dataclasses
import fnmatch
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from rcmfn.atomic import write_atomically

WRAPPER_KEYS = ("state_dict", "model", "net")  # dict keys wrapping a state dict in .pt files
# Module attribute: fnmatch patterns of our names kept float32 under a lower-precision load `dtype`.
FP32_PATTERNS_ATTR = "fp32_patterns"


@dataclass(frozen=True)
class KeyMap:
    """One checkpoint layout: how its tensor names map to the module's names and back.

    `to_ours(name)` returns our name, None for a key dropped on purpose (junk such as `._extra_state`),
    or raises KeyError for a name the layout does not know (reported as unexpected); `from_ours` is
    its inverse on our names. `shape_to_ours(our_name, shape)` optionally returns the shape of our
    tensor where the layout stores it reshaped (same numel), None if unchanged; `shape_from_ours`
    is the inverse, used on export.
    """

    to_ours: Callable[[str], str | None]
    from_ours: Callable[[str], str]
    shape_to_ours: Callable[[str, tuple[int, ...]], tuple[int, ...] | None] | None = None
    shape_from_ours: Callable[[str, tuple[int, ...]], tuple[int, ...] | None] | None = None


IDENTITY = KeyMap(to_ours=lambda name: name, from_ours=lambda name: name)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the module; the message lists missing, unexpected, mis-shaped keys."""


@dataclass(frozen=True)
class LoadReport:
    """What a load found. Names in `missing` are ours; in `unexpected` and `dropped` the file's."""

    path: str
    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # (ours, file, module)
    duplicated: tuple[str, ...] = ()  # our names that two file keys map to
    dropped: tuple[str, ...] = ()
    not_materialised: tuple[str, ...] = ()  # tensors still on meta (e.g. buffers)
    initialised: tuple[str, ...] = ()  # ours, given a fresh init after a non-strict load

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.duplicated)

    def describe(self) -> str:
        """A multi-line summary naming every problem (at most 20 names per category)."""
        lines = [f"checkpoint {self.path}: {len(self.loaded)} tensors loaded, {len(self.dropped)} dropped"]
        shapes = [f"{n}: {f} vs {m}" for n, f, m in self.mismatched]
        for title, names in [
            ("missing (in the module, not in the file)", self.missing),
            ("unexpected (in the file, not in the module)", self.unexpected),
            ("mis-shaped (name: file shape vs module shape)", shapes),
            ("duplicated (two file keys map to one name)", self.duplicated),
            ("not materialised (still on the meta device)", self.not_materialised),
            ("initialised fresh (not loadable from the file; non-strict load)", self.initialised),
        ]:
            if names:
                more = f" ... and {len(names) - 20} more" if len(names) > 20 else ""
                lines.append(f"  {len(names)} {title}: {', '.join(names[:20])}{more}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Entry:
    """One tensor in a checkpoint, read on demand: `source` is its safetensors file or the tensor."""

    name: str
    shape: tuple[int, ...]
    source: Path | Tensor


def _read(entry: _Entry, handles: dict) -> Tensor:
    """Read one entry; `handles` caches open safetensors files (closed when the dict is dropped)."""
    if isinstance(entry.source, Tensor):
        return entry.source
    if entry.source not in handles:
        handles[entry.source] = safe_open(str(entry.source), framework="pt", device="cpu")
    return handles[entry.source].get_tensor(entry.name)


def _unwrap(obj: object, path: Path) -> Mapping[str, object]:
    """Descend through `state_dict` / `model` / `net` wrappers to the flat name -> tensor dict."""
    while isinstance(obj, Mapping):
        if any(isinstance(v, Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    found = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"{path}: no tensors at the top level or under {WRAPPER_KEYS}; found {found}")


def _entries(path: str | os.PathLike | Mapping[str, Tensor]) -> Iterator[_Entry]:
    if isinstance(path, Mapping):  # tensors already read (e.g. a sharded training checkpoint's)
        yield from (_Entry(k, tuple(v.shape), v) for k, v in path.items())
        return
    path = Path(path)
    if path.suffix in (".pt", ".pth") and path.is_file():
        # weights_only: never execute pickled code; non-tensor values (e.g. `_extra_state`) are skipped.
        state = _unwrap(torch.load(path, map_location="cpu", mmap=True, weights_only=True), path)
        yield from (_Entry(k, tuple(v.shape), v) for k, v in state.items() if isinstance(v, Tensor))
        return
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise ValueError(f"{path}: several safetensors index files {[p.name for p in indexes]}")
        shards = json.loads(indexes[0].read_text())["weight_map"].values() if indexes else ()
        files = [path / s for s in sorted(set(shards))] or sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: directory holds no .safetensors files")
    elif path.suffix == ".safetensors" and path.is_file():
        files = [path]
    elif not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    else:
        raise ValueError(f"{path}: unknown checkpoint format (want .safetensors, .pt, .pth or a directory)")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield _Entry(name, tuple(f.get_slice(name).get_shape()), file)


def iter_checkpoint_tensors(path: str | os.PathLike) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) from a .safetensors file, a sharded safetensors directory or a .pt/.pth.

    SPEC-models §4 (formats). Tensors are read one at a time (safetensors) or memory-mapped (.pt).
    """
    handles: dict = {}
    for entry in _entries(path):
        yield entry.name, _read(entry, handles)


def _target_dtype(name: str, source: torch.dtype, dtype: torch.dtype | None, fp32: tuple[str, ...]):
    if dtype is None or not source.is_floating_point:
        return source
    keep_fp32 = dtype.itemsize < 4 and any(fnmatch.fnmatchcase(name, p) for p in fp32)
    return torch.float32 if keep_fp32 else dtype


def _assign(module: nn.Module, name: str, tensor: Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = tensor


def load_into_meta_module(
    module: nn.Module,
    path: str | os.PathLike | Mapping[str, Tensor],
    key_map: KeyMap,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    fresh: torch.Generator | None = None,
) -> LoadReport:
    """Materialise a module built under torch.device('meta') from a checkpoint, tensor by tensor.

    SPEC-models §2.7, §3.5. Every name and shape is checked before any data is read; with `strict`
    any missing, unexpected, mis-shaped or duplicated key raises CheckpointMismatchError listing
    them, otherwise the report says what was skipped, and with a `fresh` generator the tensors the
    file could not fill get `initialise_fresh_` (the report's `initialised`). `dtype=None` keeps the
    file's dtype; a lower precision dtype leaves the module's `fp32_patterns` in float32.
    """
    expected = {name: tuple(t.shape) for name, t in module.state_dict(keep_vars=True).items()}
    plan: dict[str, _Entry] = {}
    unexpected, mismatched, duplicated, dropped = [], [], [], []
    for entry in _entries(path):
        try:
            ours = key_map.to_ours(entry.name)
        except KeyError:  # a name the layout does not know
            ours = ""
        if ours is None:
            dropped.append(entry.name)
        elif ours not in expected:
            unexpected.append(entry.name)
        elif (
            tuple((key_map.shape_to_ours and key_map.shape_to_ours(ours, entry.shape)) or entry.shape) != expected[ours]
        ):
            mismatched.append((ours, entry.shape, expected[ours]))
        elif ours in plan:
            duplicated.append(ours)
        else:
            plan[ours] = entry
    seen = set(plan) | {m[0] for m in mismatched}
    missing = [n for n in expected if n not in seen]
    report = LoadReport(str(path), *map(tuple, (plan, missing, unexpected, mismatched, duplicated, dropped)))
    if strict and not report.ok:
        raise CheckpointMismatchError(report.describe())
    fp32 = tuple(getattr(module, FP32_PATTERNS_ATTR, ()))
    handles: dict = {}
    with torch.no_grad():
        for ours, entry in plan.items():
            tensor = _read(entry, handles).reshape(expected[ours])
            target = _target_dtype(ours, tensor.dtype, dtype, fp32)
            _assign(module, ours, tensor.to(device=device, dtype=target, copy=True))
    on_meta = tuple(n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta)
    report = dataclasses.replace(report, not_materialised=on_meta)
    if strict and on_meta:
        raise CheckpointMismatchError(report.describe())
    if on_meta and fresh is not None:
        initialise_fresh_(module, on_meta, dtype, device, fresh)
        report = dataclasses.replace(report, not_materialised=(), initialised=on_meta)
    return report


@torch.no_grad()
def initialise_fresh_(
    module: nn.Module,
    names: tuple[str, ...],
    dtype: torch.dtype | None,
    device: torch.device | str,
    generator: torch.Generator,
) -> None:
    """Materialise the meta tensors `names` (ours) with a fresh init that needs no knowledge of the
    family: biases 0, other 1-D weights 1 (norm scales), tensors of two or more dims N(0, 1/fan_in)
    with fan_in = numel / shape[0], anything else 0. dtype as `load_into_meta_module` would give
    (None: the dtype most loaded tensors have). For non-strict loads: the run can start, and the
    report names what is new.
    """
    fp32 = tuple(getattr(module, FP32_PATTERNS_ATTR, ()))
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    if dtype is None:
        loaded = [t.dtype for t in state.values() if not t.is_meta and t.is_floating_point()]
        dtype = max(set(loaded), key=loaded.count) if loaded else torch.float32
    for name in names:
        shape = tuple(state[name].shape)
        value = torch.zeros(shape)
        if len(shape) >= 2:
            fan_in = max(1, value.numel() // shape[0])
            value = torch.randn(shape, generator=generator) / fan_in**0.5
        elif len(shape) == 1 and name.endswith("weight"):
            value = torch.ones(shape)
        _assign(module, name, value.to(device=device, dtype=_target_dtype(name, torch.float32, dtype, fp32)))


def layout_tensors(params: Mapping[str, Tensor], key_map: KeyMap) -> dict[str, Tensor]:
    """Our-named tensors renamed and reshaped into the layout of `key_map`: contiguous CPU tensors that
    own their storage (safetensors refuses views into shared storage). SPEC-models §3.5 (layouts)."""
    out: dict[str, Tensor] = {}
    for ours, tensor in params.items():
        name = key_map.from_ours(ours)
        if name in out:
            raise ValueError(f"two tensors export to the same key {name!r} (second from {ours!r})")
        shape = key_map.shape_from_ours and key_map.shape_from_ours(ours, tuple(tensor.shape))
        tensor = tensor.detach().to("cpu").contiguous()
        tensor = tensor.reshape(shape).contiguous() if shape else tensor
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view into shared storage (e.g. consolidated): safetensors refuses
        out[name] = tensor
    return out


def export_checkpoint(params: Mapping[str, Tensor], path: str | os.PathLike, key_map: KeyMap) -> None:
    """Write our-named tensors as one .safetensors file in the layout of `key_map`, atomically.

    SPEC-models §3.5 (layouts). The file is written next to `path` under a temporary name and moved
    into place with os.replace, so a crash never leaves a truncated checkpoint behind.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors; got {path}")
    out = layout_tensors(params, key_map)
    write_atomically(path, lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
