"""`python -m entrypoints.prepare`: captioned images / videos (or the toy mixture) -> training shards.

Real models: every medium is read, fitted to the training size, VAE-encoded to a normalised latent and
its caption encoded by the text encoder; the pairs go to rcmfn.shards through a ShardWriter, with CFG's
unconditional input recorded beside them (SPEC-rcm §11): the negative prompt's embedding, or all zeros
(Cosmos without a negative prompt; rcmfn.models.registry.unconditional_prompt). Unreadable or unfit media and over-long
captions are skipped and listed, never fatal. Resumable: prepare_progress.json records which inputs
each shard holds and which were skipped, so a rerun continues after the last complete shard.
Toy (`--model toy`): exact samples of the Gaussian mixture with their class embeddings.
Teacher samples (`--from-teacher --teacher <ckpt> --prompt-file <txt>`): entrypoints/teacher_data.py.
"""

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from tqdm.auto import tqdm

from entrypoints.image_condition import image_condition_of, sample_condition, stored_conditions
from entrypoints.teacher_data import describe_teacher_result, prepare_from_teacher
from entrypoints.teacher_data_config import TeacherDataConfig, check_teacher_flags
from entrypoints.toy import ToyConfig
from rcmfn import codecs, media
from rcmfn.atomic import write_json_atomically
from rcmfn.models.registry import MODELS, ModelSpec, get_spec, unconditional_prompt
from rcmfn.shards import ShardWriter, read_manifest, write_negative_embedding, write_zero_uncondition
from rcmfn.toy import gmm

PROGRESS = "prepare_progress.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class PrepareConfig:
    """Write training shards (latents, text embeddings, prompts, manifest, CFG's unconditional input)."""

    output: Path = Path("data/toy")
    """dataset folder (created; an existing one is resumed)"""
    model: str = "toy"
    """'toy' or a network of rcmfn/models/registry.py: sets the text width and the default size"""
    input: Path | None = None
    """media folder (captions in same-name .txt files) or a .csv / .jsonl list with path and caption"""
    text_encoder: Path | None = None
    """local text-encoder folder (HF layout, never downloaded)"""
    vae: Path | None = None
    """local Wan2.1 VAE folder (diffusers layout)"""
    image_encoder: Path | None = None
    """image-to-video models: local CLIP vision folder (HF layout); each sample's first frame is the image"""
    height: int | None = None
    """pixel height (default: the model's training resolution)"""
    width: int | None = None
    """pixel width (default: the model's training resolution)"""
    frames: int | None = None
    """pixel frames per sample, 1 + 4k (default: the model's training frames: Wan 1.3B 77, 14B 81, Cosmos T2I 1)"""
    frame_stride: int = 1
    """take every n-th video frame"""
    fit: Literal["crop", "exact"] = "crop"
    """crop: scale to cover and crop the centre; exact: skip media of another size"""
    truncate_prompts: bool = False
    """cut captions longer than the encoder's 512 tokens (default: skip and list them)"""
    negative_prompt: str | None = None
    """CFG's unconditional input is this prompt's embedding (default: Wan's default negative prompt for Wan;
    all-zero text embedding for Cosmos, also when empty)"""
    shard_size: int = 256
    """samples per shard file (--from-teacher: also what a restart redoes at most per rank)"""
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    """stored dtype (default bfloat16; float32 for the toy)"""
    device: str | None = None
    """torch device of the encoders (default cuda if available)"""
    count: int = 1024
    """toy: number of mixture samples"""
    seed: int = 0
    """seed of the toy's label and sample draws and of the teacher's noise (sample i uses its own generator)"""
    mixture: gmm.MixtureConfig = field(default_factory=lambda: ToyConfig().mixture)
    """toy: the mixture, by default the distill toy's (must match the run's toy mixture settings)"""
    progress: bool = True
    """show a progress bar"""
    teacher_data: Annotated[TeacherDataConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=TeacherDataConfig)
    """--from-teacher and its settings (entrypoints/teacher_data_config.py)"""

    def __post_init__(self):
        if self.model != "toy":
            get_spec(self.model)
        for name in ("frame_stride", "shard_size", "count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        check_teacher_flags(self)


def atomic_json(path: Path, value) -> None:
    write_json_atomically(path, value, indent=1, ensure_ascii=False)


def list_inputs(source: Path) -> list[tuple[str, Path, str | None]]:
    """(key, media path, caption or None) in a fixed order, from a folder or a .csv / .jsonl list."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in media.IMAGE_SUFFIXES + media.VIDEO_SUFFIXES)
        captions = [p.with_suffix(".txt") for p in files]
        return [
            (str(p.relative_to(source)), p, c.read_text().strip() if c.is_file() else None)
            for p, c in zip(files, captions, strict=True)
        ]
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    if source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            records = list(csv.DictReader(f))
    elif source.suffix.lower() == ".jsonl":
        records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"input must be a folder, a .csv or a .jsonl list; got {source}")
    items = []
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or "path" not in rec or "caption" not in rec:
            raise ValueError(f"{source}: record {n} needs 'path' and 'caption' fields; got {rec!r}")
        path = Path(rec["path"]) if Path(rec["path"]).is_absolute() else source.parent / rec["path"]
        items.append((f"{n}:{rec['path']}", path, rec["caption"]))
    return items


def prepare_toy(cfg: PrepareConfig) -> dict:
    """Exact mixture samples, labels uniform, text = the class embedding, negative = the null embedding."""
    mixture = gmm.build_mixture(cfg.mixture)
    cfg.output.mkdir(parents=True, exist_ok=True)
    saved = cfg.output / "toy.json"
    settings = json.loads(json.dumps({"mixture": asdict(cfg.mixture), "seed": cfg.seed}))
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise ValueError(f"{cfg.output} holds toy samples of another mixture or seed ({saved}); use a new folder")
    atomic_json(saved, settings)
    text_shape = tuple(mixture.text.shape[1:])
    writer = ShardWriter(cfg.output, mixture.shape, text_shape, cfg.dtype or "float32", cfg.shard_size)
    write_negative_embedding(cfg.output, mixture.null_text)
    start = writer.manifest.count  # samples of complete shards; the rest is drawn again, identically
    for i in tqdm(range(start, cfg.count), disable=not cfg.progress, desc="toy shards"):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        label = torch.randint(0, mixture.num_classes, (1,), generator=gen)
        x0 = gmm.sample_mixture(mixture, label, gen)
        writer.add(x0[0], gmm.class_embeddings(mixture, label)[0], f"class {label.item()}")
    manifest = writer.close()
    return {"written": manifest.count - start, "total": manifest.count, "skipped": {}}


class Progress:
    """prepare_progress.json: the input keys of each complete shard and the skipped inputs with reasons."""

    def __init__(self, folder: Path, shards_in_manifest: int):
        self.path = folder / PROGRESS
        state = json.loads(self.path.read_text()) if self.path.exists() else {"shards": [], "skipped": {}}
        if len(state["shards"]) < shards_in_manifest:
            raise ValueError(
                f"{folder} has {shards_in_manifest} shards but {self.path.name} knows "
                f"{len(state['shards'])}: not written by prepare; use a new folder"
            )
        self.shards = state["shards"][:shards_in_manifest]  # an entry past the manifest never got written
        self.skipped: dict[str, str] = state["skipped"]

    def done(self) -> set[str]:
        return {key for shard in self.shards for key in shard} | set(self.skipped)

    def save(self, pending: list[str] | None = None) -> None:
        """Write the state; `pending` = keys of the shard about to be written, listed before it exists."""
        atomic_json(self.path, {"shards": self.shards + ([pending] if pending else []), "skipped": self.skipped})


def prepare_media(cfg: PrepareConfig, spec: ModelSpec) -> dict:
    """Encode every not-yet-done input and append it to the shards; skip and list the unfit ones."""
    if cfg.input is None:
        raise ValueError(f"--model {cfg.model} needs --input (a media folder or a .csv / .jsonl list)")
    items = list_inputs(cfg.input)
    default_frames, default_height, default_width = spec.pixel_shape  # the model's training size
    frames, height, width = cfg.frames or default_frames, cfg.height or default_height, cfg.width or default_width
    shape = codecs.latent_shape(frames, height, width, spec.vae_stride, spec.channels)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = codecs.load_vae(cfg.vae, device, stride=spec.vae_stride, channels=spec.channels)
    encoder = codecs.load_text_encoder(cfg.text_encoder, device, torch.bfloat16, spec.text_len)
    if encoder.dim != spec.text_dim:
        raise ValueError(f"text encoder width {encoder.dim} != {cfg.model}'s text width {spec.text_dim}")
    condition_of = image_condition_of(spec, cfg.image_encoder, vae, frames, device)
    conditions = stored_conditions(condition_of, spec.text_dim, height, width)  # {} unless image-to-video
    text_shape = (spec.text_len, spec.text_dim)
    writer = ShardWriter(cfg.output, shape, text_shape, cfg.dtype or "bfloat16", cfg.shard_size, conditions)
    progress = Progress(cfg.output, len(writer.manifest.shards))
    negative = unconditional_prompt(spec, cfg.negative_prompt)
    if negative is None:
        write_zero_uncondition(cfg.output)
    else:
        write_negative_embedding(cfg.output, encoder.encode([negative], what="negative prompt")[0].float().cpu())
    done, pending, skipped_now = progress.done(), [], {}
    todo = [item for item in items if item[0] not in done]
    for key, path, caption in tqdm(todo, disable=not cfg.progress, desc="encode"):
        try:
            if caption is None:
                raise media.MediaError(f"{path}: no caption ({path.with_suffix('.txt').name} missing)")
            if not str(caption).strip():  # as good as missing: a "" prompt would train on the uncondition
                raise media.MediaError(f"{path}: empty caption")
            embedding = encoder.encode([caption], truncate=cfg.truncate_prompts, what="caption")[0]
            clip = media.fit_frames(
                media.read_media(path, frames, cfg.frame_stride), frames, height, width, cfg.fit, source=str(path)
            )
            latent = vae.encode(media.to_pixels(clip)[None])[0]
            condition = sample_condition(condition_of, embedding, media.to_pixels(clip))
        except (media.MediaError, codecs.PromptTooLongError) as err:
            progress.skipped[key] = skipped_now[key] = str(err)
            progress.save(pending)
            continue
        pending.append(key)
        if len(pending) == cfg.shard_size:  # this add writes a shard: record its inputs first
            progress.save(pending)
            progress.shards.append(pending)
            pending = []
        writer.add(latent.cpu(), embedding.float().cpu(), caption, condition)
    progress.save(pending)
    if pending:
        progress.shards.append(pending)
    manifest = writer.close()
    progress.save()
    return {
        "written": len(todo) - len(skipped_now),
        "total": manifest.count,
        "skipped": skipped_now,
        "previously_skipped": len(progress.skipped) - len(skipped_now),
    }


def main() -> None:
    cfg = tyro.cli(PrepareConfig, description=__doc__.splitlines()[0] + f" Models: toy, {', '.join(MODELS)}.")
    if cfg.teacher_data.from_teacher:
        result = prepare_from_teacher(cfg, get_spec(cfg.model))
        if result["rank"] == 0:
            print(describe_teacher_result(cfg, result))
        return
    result = prepare_toy(cfg) if cfg.model == "toy" else prepare_media(cfg, get_spec(cfg.model))
    manifest = read_manifest(cfg.output)
    print(
        f"{cfg.output}: {result['written']} samples written now, {manifest.count} in {len(manifest.shards)} shards; "
        f"latent {list(manifest.latent_shape)}, text {list(manifest.text_shape)}, {manifest.dtype}, "
        f"uncondition {manifest.uncondition}"
    )
    for key, reason in list(result["skipped"].items())[:20]:
        print(f"  skipped {key}: {reason}")
    if len(result["skipped"]) > 20:
        print(f"  ... and {len(result['skipped']) - 20} more (all listed in {cfg.output / PROGRESS})")


if __name__ == "__main__":
    main()
