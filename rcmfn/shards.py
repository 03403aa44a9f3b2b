"""Training data on disk: safetensors shards of (latent, text embedding), and a deterministic per-rank loader.

SPEC-rcm §11 (what a sample holds: a clean latent, the text-encoder states, the prompt; one
unconditional input for CFG). The official code reads webdataset tars; this is our own format:

  <folder>/manifest.json            {"format": "rcmfn-shards", "version": 1, "latent_shape": [C, T, H, W],
                                     "text_shape": [L, D], "dtype": "bfloat16",
                                     "shards": [{"file": "shard-00000.safetensors", "count": N,
                                                 "prompts": "shard-00000.json" | null}, ...],
                                     "negative_embedding": "negative.safetensors" | null,
                                     "uncondition": "negative_prompt" | "zeros"}
  <folder>/shard-00000.safetensors  "latents" [N, C, T, H, W], "text_embeddings" [N, L, D]
  <folder>/shard-00000.json         optional sidecar: the N prompts, a JSON list of strings

A dataset whose net reads more than the text (Wan I2V) lists per-sample condition tensors in the manifest,
"conditions": {"image": [257, 1280], "latent": [20, T, H, W]}, stored in every shard as "condition.image"
[N, 257, 1280] etc.; the loader returns them by name and the trainer makes them the condition TensorDict
next to the text (rcmfn.condition). Manifests without the field have none.
  <folder>/negative.safetensors     with "uncondition": "negative_prompt": "text_embedding" [L, D]

"uncondition" says what CFG's unconditional text input is (`read_uncondition`): the negative prompt's
embedding in negative.safetensors (Wan; the toy's null class embedding), or an all-zero embedding of the
text shape (Cosmos without a negative prompt; rcmfn.models.registry.unconditional_prompt says which).
A manifest written before the field existed is read as "negative_prompt" when it lists a negative
embedding and "zeros" otherwise.

Every file is written under a temporary name and renamed into place, and the manifest only ever lists
complete shards, so a crash while writing never leaves a dataset that reads wrong. No torch.distributed
here: the loader takes the data-parallel rank and world size as integers (ranks of one context-parallel
group pass the same data rank and so read the same batches).

Longer than a math module's 250 lines on purpose (size budget: this is IO, and most lines are
validation naming the broken file; a writer, a reader and a loader of one format belong together).
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rcmfn.atomic import write_atomically

FORMAT, VERSION = "rcmfn-shards", 1
MANIFEST, NEGATIVE = "manifest.json", "negative.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
UNCONDITIONS = ("negative_prompt", "zeros")
_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class DatasetError(ValueError):
    """A shard folder is missing, corrupt, or does not match its manifest; the message says which file."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard of the manifest: its safetensors file, how many samples, and its prompt sidecar."""

    file: str
    count: int
    prompts: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated manifest.json of a shard folder."""

    folder: Path
    latent_shape: tuple[int, int, int, int]
    text_shape: tuple[int, int]
    dtype: str
    shards: tuple[ShardInfo, ...]
    negative_embedding: str | None
    uncondition: str = "zeros"
    """CFG's unconditional text input: "negative_prompt" (the stored negative embedding) or "zeros"."""
    conditions: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Per-sample condition tensors beside the text, (name, shape) pairs (module docstring); () for none."""

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "latent_shape": list(self.latent_shape),
            "text_shape": list(self.text_shape),
            "dtype": self.dtype,
            "shards": [{"file": s.file, "count": s.count, "prompts": s.prompts} for s in self.shards],
            "negative_embedding": self.negative_embedding,
            "uncondition": self.uncondition,
            **({"conditions": {name: list(shape) for name, shape in self.conditions}} if self.conditions else {}),
        }


_atomic_write = write_atomically  # (path, write)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _check_dtype(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    return name


def _tensor_header(path: Path, key: str) -> tuple[tuple[int, ...], str]:
    """(shape, safetensors dtype) of `key` in a safetensors file, read from the header only."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if key not in f.keys():
                raise DatasetError(f"{path}: no tensor {key!r}; found {sorted(f.keys())}")
            piece = f.get_slice(key)
            return tuple(piece.get_shape()), piece.get_dtype()
    except DatasetError:
        raise
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise DatasetError(f"{path}: not a readable safetensors file ({err})") from err


def _expect(path: Path, key: str, shape: tuple[int, ...], dtype: str) -> None:
    found, found_dtype = _tensor_header(path, key)
    if found != shape or found_dtype != _SAFETENSORS_DTYPES[dtype]:
        raise DatasetError(
            f"{path}: {key!r} is {found_dtype} {list(found)}; the manifest says "
            f"{_SAFETENSORS_DTYPES[dtype]} {list(shape)}"
        )


def _parse(folder: Path, raw: object) -> Manifest:
    where = folder / MANIFEST
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DatasetError(
            f"{where}: not an {FORMAT} manifest (format field {raw.get('format') if isinstance(raw, dict) else raw!r})"  # noqa: E501
        )
    if raw.get("version") != VERSION:
        raise DatasetError(f"{where}: version {raw.get('version')!r}; this reader knows version {VERSION}")
    try:
        latent_shape, text_shape = (
            tuple(int(n) for n in raw["latent_shape"]),
            tuple(int(n) for n in raw["text_shape"]),
        )
        shards = tuple(ShardInfo(s["file"], int(s["count"]), s.get("prompts")) for s in raw["shards"])
        dtype, negative = raw["dtype"], raw.get("negative_embedding")
        uncondition = raw.get("uncondition", "zeros" if negative is None else "negative_prompt")
        conditions = tuple((str(k), tuple(int(n) for n in v)) for k, v in raw.get("conditions", {}).items())
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{where}: malformed field ({err!r})") from err
    if len(latent_shape) != 4 or len(text_shape) != 2 or min(latent_shape + text_shape) < 1:
        raise DatasetError(
            f"{where}: latent_shape must be [C, T, H, W] and text_shape [L, D], positive; "
            f"got {list(latent_shape)} and {list(text_shape)}"
        )
    if dtype not in DTYPES:
        raise DatasetError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if uncondition not in UNCONDITIONS or (uncondition == "negative_prompt") != (negative is not None):
        raise DatasetError(
            f"{where}: uncondition {uncondition!r} with negative_embedding {negative!r}; expected "
            '"negative_prompt" with a negative embedding file or "zeros" without one'
        )
    return Manifest(folder, latent_shape, text_shape, dtype, shards, negative, uncondition, conditions)


def read_manifest(folder: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Read and validate `folder`/manifest.json; with `check_files`, every shard's header too.

    Raises DatasetError naming the file for: a missing folder or manifest, malformed JSON, an unknown
    format or version, a shard file that is missing, unreadable or whose tensors disagree with the
    manifest's shapes, counts or dtype, a prompt sidecar of the wrong length, a bad negative embedding.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"data folder {folder} does not exist")
    if not (folder / MANIFEST).is_file():
        raise DatasetError(f"{folder} has no {MANIFEST}; is it an {FORMAT} dataset?")
    try:
        raw = json.loads((folder / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{folder / MANIFEST}: not valid JSON ({err})") from err
    manifest = _parse(folder, raw)
    if not check_files:
        return manifest
    for shard in manifest.shards:
        path = folder / shard.file
        if not path.is_file():
            raise DatasetError(f"{path}: listed in the manifest but missing")
        _expect(path, "latents", (shard.count, *manifest.latent_shape), manifest.dtype)
        _expect(path, "text_embeddings", (shard.count, *manifest.text_shape), manifest.dtype)
        for name, shape in manifest.conditions:
            _expect(path, f"condition.{name}", (shard.count, *shape), manifest.dtype)
        if shard.prompts is not None:
            prompts = _read_prompts(folder / shard.prompts)
            if len(prompts) != shard.count:
                raise DatasetError(f"{folder / shard.prompts}: {len(prompts)} prompts for {shard.count} samples")
    if manifest.negative_embedding is not None:
        path = folder / manifest.negative_embedding
        if not path.is_file():
            raise DatasetError(f"{path}: negative embedding listed in the manifest but missing")
        _expect(path, "text_embedding", manifest.text_shape, manifest.dtype)
    return manifest


def _read_prompts(path: Path) -> list[str]:
    try:
        prompts = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the prompt sidecar ({err})") from err
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise DatasetError(f"{path}: the prompt sidecar must be a JSON list of strings")
    return prompts


def write_manifest(manifest: Manifest) -> None:
    """Write `manifest` as its folder's manifest.json, atomically (list only shards that are complete)."""
    _write_text(manifest.folder / MANIFEST, json.dumps(manifest.to_json(), indent=1) + "\n")


def write_shard(
    folder: Path,
    name: str,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    prompts: list[str | None],
    conditions: dict[str, torch.Tensor] | None = None,
) -> ShardInfo:
    """Write one shard, `name`.safetensors (stacked latents [N, C, T, H, W] and text embeddings [N, L, D], in
    the dataset's dtype already) and its prompt sidecar `name`.json unless every prompt is None; each file
    atomically. The caller lists the returned ShardInfo in the manifest once the shard counts as written."""
    tensors = {"latents": latents.contiguous(), "text_embeddings": text_embeddings.contiguous()}
    tensors |= {f"condition.{k}": v.contiguous() for k, v in (conditions or {}).items()}
    _atomic_write(folder / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
    sidecar = None
    if any(p is not None for p in prompts):
        sidecar = f"{name}.json"
        _write_text(folder / sidecar, json.dumps([p or "" for p in prompts], ensure_ascii=False))
    return ShardInfo(f"{name}.safetensors", len(prompts), sidecar)


def write_negative_embedding(folder: str | os.PathLike, embedding: torch.Tensor) -> Path:
    """Store the uncondition's text embedding [L, D] (SPEC-rcm §11.2) and list it in the manifest.

    The folder must already hold a manifest (write the shards first, or at least open a ShardWriter);
    the embedding must have the manifest's text_shape and is stored in its dtype.
    """
    manifest = read_manifest(folder, check_files=False)
    if tuple(embedding.shape) != manifest.text_shape:
        raise ValueError(
            f"negative embedding must have the text shape {list(manifest.text_shape)}; got {list(embedding.shape)}"
        )
    path = manifest.folder / NEGATIVE
    tensor = embedding.detach().to("cpu", DTYPES[manifest.dtype]).contiguous()
    _atomic_write(path, lambda tmp: save_file({"text_embedding": tensor}, tmp))
    write_manifest(Manifest(**{**manifest.__dict__, "negative_embedding": NEGATIVE, "uncondition": "negative_prompt"}))
    return path


def write_zero_uncondition(folder: str | os.PathLike) -> None:
    """Record an all-zero unconditional text input (Cosmos-Predict2's, see
    rcmfn.models.registry.unconditional_prompt) in the manifest, dropping a stored negative embedding."""
    manifest = read_manifest(folder, check_files=False)
    write_manifest(Manifest(**{**manifest.__dict__, "negative_embedding": None, "uncondition": "zeros"}))
    (manifest.folder / NEGATIVE).unlink(missing_ok=True)


def read_negative_embedding(folder: str | os.PathLike) -> torch.Tensor | None:
    """The stored negative embedding [L, D], or None if the dataset has none."""
    manifest = read_manifest(folder, check_files=False)
    if manifest.negative_embedding is None:
        return None
    path = manifest.folder / manifest.negative_embedding
    _expect(path, "text_embedding", manifest.text_shape, manifest.dtype)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.get_tensor("text_embedding")


def read_uncondition(folder: str | os.PathLike) -> torch.Tensor:
    """CFG's unconditional text input [L, D] in the stored dtype, as the manifest's "uncondition" says:
    the stored negative embedding, or zeros of the text shape."""
    manifest = read_manifest(folder, check_files=False)
    if manifest.uncondition == "zeros":
        return torch.zeros(manifest.text_shape, dtype=DTYPES[manifest.dtype])
    return read_negative_embedding(folder)


class ShardWriter:
    """Append samples to a shard folder; every `shard_size` samples become one shard file.

    Reopening a folder that already has a manifest appends after its last shard (the shapes and
    dtype must match). The manifest is rewritten atomically after every shard, so an interrupted
    writer leaves a valid dataset of the complete shards; `close()` writes the final partial one.
    """

    def __init__(self, folder, latent_shape, text_shape, dtype="bfloat16", shard_size: int = 256, conditions=None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1; got {shard_size}")
        self.folder, self.shard_size = Path(folder), shard_size
        dtype = _check_dtype(dtype)
        conditions = tuple((str(k), tuple(int(n) for n in v)) for k, v in (conditions or {}).items())
        latent_shape, text_shape = tuple(int(n) for n in latent_shape), tuple(int(n) for n in text_shape)
        if len(latent_shape) != 4 or len(text_shape) != 2 or min(latent_shape + text_shape) < 1:
            raise ValueError(
                f"latent_shape must be (C, T, H, W) and text_shape (L, D), positive; "
                f"got {latent_shape} and {text_shape}"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / MANIFEST).exists():
            self.manifest = read_manifest(self.folder)
            found = (self.manifest.latent_shape, self.manifest.text_shape, self.manifest.dtype)
            if found + (self.manifest.conditions,) != (latent_shape, text_shape, dtype, conditions):
                raise ValueError(
                    f"{self.folder} holds latents {found[0]}, text {found[1]}, {found[2]}, conditions "
                    f"{dict(self.manifest.conditions)}; cannot append latents {latent_shape}, text {text_shape}, "
                    f"{dtype}, conditions {dict(conditions)}"
                )
        else:
            self.manifest = Manifest(self.folder, latent_shape, text_shape, dtype, (), None, conditions=conditions)
            write_manifest(self.manifest)
        self._latents: list[torch.Tensor] = []
        self._texts: list[torch.Tensor] = []
        self._prompts: list[str | None] = []
        self._conditions: list[dict[str, torch.Tensor]] = []

    def add(
        self,
        latent: torch.Tensor,
        text_embedding: torch.Tensor,
        prompt: str | None = None,
        condition: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Queue one sample: latent [C, T, H, W], text embedding [L, D], optional prompt, and the
        dataset's condition tensors by name (required exactly when the manifest lists conditions)."""
        condition = condition or {}
        shapes = {k: tuple(v.shape) for k, v in condition.items()}
        if shapes != dict(self.manifest.conditions):
            raise ValueError(f"condition shapes {shapes} != the dataset's conditions {dict(self.manifest.conditions)}")
        if tuple(latent.shape) != self.manifest.latent_shape:
            raise ValueError(
                f"latent shape {list(latent.shape)} != dataset latent_shape {list(self.manifest.latent_shape)}"
            )
        if tuple(text_embedding.shape) != self.manifest.text_shape:
            raise ValueError(
                f"text embedding shape {list(text_embedding.shape)} != dataset text_shape "
                f"{list(self.manifest.text_shape)}"
            )
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or None; got {type(prompt).__name__}")
        dtype = DTYPES[self.manifest.dtype]
        latent, text_embedding = latent.detach().to("cpu", dtype), text_embedding.detach().to("cpu", dtype)
        condition = {k: v.detach().to("cpu", dtype) for k, v in condition.items()}
        for what, tensor in (("latent", latent), ("text embedding", text_embedding), *condition.items()):
            if not torch.isfinite(tensor).all():  # after the cast: a value the dtype cannot hold is inf
                sample = self.manifest.count + len(self._latents)
                raise ValueError(f"sample {sample} (prompt {prompt!r}): its {what} holds non-finite values")
        self._latents.append(latent)
        self._texts.append(text_embedding)
        self._prompts.append(prompt)
        self._conditions.append(condition)
        if len(self._latents) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the queued samples (if any) as the next shard and list it in the manifest."""
        if not self._latents:
            return
        name = f"shard-{len(self.manifest.shards):05d}"
        conditions = {k: torch.stack([c[k] for c in self._conditions]) for k, _ in self.manifest.conditions}
        shard = write_shard(
            self.folder, name, torch.stack(self._latents), torch.stack(self._texts), self._prompts, conditions
        )
        # Re-read: keeps an uncondition written meanwhile by write_negative_embedding / write_zero_uncondition.
        current = read_manifest(self.folder, check_files=False)
        shards = (*self.manifest.shards, shard)
        self.manifest = Manifest(
            **{
                **self.manifest.__dict__,
                "shards": shards,
                "negative_embedding": current.negative_embedding,
                "uncondition": current.uncondition,
            }
        )
        write_manifest(self.manifest)
        self._latents, self._texts, self._prompts, self._conditions = [], [], [], []

    def close(self) -> Manifest:
        """Write the last (possibly partial) shard; return the final manifest."""
        self.flush()
        return read_manifest(self.folder)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class ShardBatch:
    """One rank's batch: latents [B, C, T, H, W] and text embeddings [B, L, D] in the stored dtype."""

    latents: torch.Tensor
    text_embeddings: torch.Tensor
    prompts: tuple[str, ...]
    indices: tuple[int, ...]  # global sample indices (for tests and provenance)
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    """The manifest's condition tensors by name, [B, ...] each (none for a text-only dataset)."""


class ShardLoader:
    """Endless, deterministic batches for data-parallel rank `rank` of `world`.

    Each epoch is one permutation of all samples drawn from (seed, epoch); it is cut into global
    batches of batch_size * world samples (the incomplete tail is dropped, as the official loader
    keeps full batches only) and rank r takes slice r of each. The position (epoch, samples consumed)
    is global, so `state_dict()` resumes exactly, even with another world size.
    """

    def __init__(self, folder, batch_size: int, rank: int, world: int, seed: int = 0):
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(
                f"need batch_size >= 1, world >= 1 and 0 <= rank < world; "
                f"got batch_size={batch_size}, rank={rank}, world={world}"
            )
        self.manifest = read_manifest(folder)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        if self.manifest.count < batch_size * world:
            raise DatasetError(
                f"{self.manifest.folder}: {self.manifest.count} samples cannot fill one global "
                f"batch of {batch_size} x {world} ranks"
            )
        starts = torch.tensor([0] + [s.count for s in self.manifest.shards]).cumsum(0)
        self._starts = starts.tolist()
        self._handles: dict[int, object] = {}
        self._prompts: dict[int, list[str] | None] = {}
        self.epoch, self.position = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample permutation of `epoch` (identical on every rank)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.manifest.count, generator=generator)

    def _locate(self, index: int) -> tuple[int, int]:
        shard = next(s for s in range(len(self._starts) - 1) if index < self._starts[s + 1])
        return shard, index - self._starts[shard]

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, dict[str, torch.Tensor]]:
        shard, row = self._locate(index)
        info = self.manifest.shards[shard]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.manifest.folder / info.file), framework="pt", device="cpu")
            self._prompts[shard] = _read_prompts(self.manifest.folder / info.prompts) if info.prompts else None
        handle, prompts = self._handles[shard], self._prompts[shard]
        latent = handle.get_slice("latents")[row : row + 1][0]
        text = handle.get_slice("text_embeddings")[row : row + 1][0]
        condition = {k: handle.get_slice(f"condition.{k}")[row : row + 1][0] for k, _ in self.manifest.conditions}
        for what, tensor in (("latents", latent), ("text_embeddings", text), *condition.items()):
            if not torch.isfinite(tensor).all():  # a NaN sample trains silently (its losses are masked to 0)
                raise ValueError(f"{self.manifest.folder / info.file}: row {row} of {what} holds non-finite values")
        return latent, text, "" if prompts is None else prompts[row], condition

    def __iter__(self):
        return self

    def __next__(self) -> ShardBatch:
        if self.position + self.global_batch > self.manifest.count:
            self.epoch, self.position = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        start = self.position + self.rank * self.batch_size
        indices = order[start : start + self.batch_size].tolist()
        self.position += self.global_batch
        samples = [self._read(i) for i in indices]
        return ShardBatch(
            torch.stack([s[0] for s in samples]),
            torch.stack([s[1] for s in samples]),
            tuple(s[2] for s in samples),
            tuple(indices),
            {k: torch.stack([s[3][k] for s in samples]) for k, _ in self.manifest.conditions},
        )

    def state_dict(self) -> dict:
        """Global position: the same on every rank, independent of rank and world size."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "count": self.manifest.count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; the seed and the dataset size must match the saved ones."""
        if state["seed"] != self.seed or state["count"] != self.manifest.count:
            raise ValueError(
                f"loader state was saved for seed {state['seed']} over {state['count']} samples; "
                f"this loader has seed {self.seed} over {self.manifest.count}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
