"""Teacher-generated training data: the prompt list, per-prompt noise, the shard plan over ranks, and the
records that make a written shard verifiable.

SPEC-rcm §11.1 and Errata (the official runs distil on samples of the Wan2.1 14B teacher, not on real
videos; NVlabs/rcm rcm/datasets/build_synthetic_dataset.py: Euler, per-sample seed = 0 + sample index),
§6.2 (the teacher sampler, rcmfn.samplers.teacher_euler_sample). What a sample is depends only on the
settings and its prompt index i: its noise is drawn from a generator seeded by (seed, i), and shard k always
holds prompts [k S, (k + 1) S) of the prompt list (S the shard size), so neither the number of ranks nor a
restart changes what a shard holds. A shard counts as written once its record `shard-0000k.record.json`
(prompt range and SHA-256 of the shard's files, written last) exists and the files still match it; a shard
cut short has no record and is written again. No torch.distributed here: ranks are integers (the process
group lives in entrypoints/teacher_data.py).
"""

import json
from pathlib import Path

import torch

from rcmfn.atomic import write_json_atomically
from rcmfn.checksums import file_digest
from rcmfn.shards import ShardInfo, write_shard

SETTINGS = "teacher.json"
RECORD_SUFFIX = ".record.json"
SEED_STRIDE = 1_000_003  # prepare's toy draws use the same rule: seed * stride + sample index


def read_prompt_file(path: Path | None) -> list[str]:
    """The prompts of a UTF-8 text file, one per non-empty line (stripped), in file order; a prompt's index
    is its position among the non-empty lines. FileNotFoundError / ValueError name the file."""
    if path is None:
        raise ValueError("--from-teacher needs --prompt-file (a text file with one prompt per line)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one prompt per non-empty line)")
    return prompts


def prompt_seed(seed: int, index: int) -> int:
    """Seed of prompt `index`'s noise: seed * 1_000_003 + index. With seed 0, sample i is seeded i, the
    official builder's per-sample seed (SPEC-rcm §6.2); distinct (seed, index) pairs below 1_000_003
    prompts never share a seed."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and prompt index must be >= 0; got {seed}, {index}")
    return seed * SEED_STRIDE + index


def prompt_noise(shape: tuple[int, ...], seed: int, indices: range | list[int]) -> torch.Tensor:
    """Unit Gaussian start states [B, *shape], float32 on the CPU, row b from its own generator seeded by
    prompt_seed(seed, indices[b]): a sample's noise does not depend on its batch, rank or device."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(prompt_seed(seed, i))) for i in indices]
    )


def shard_ranges(count: int, shard_size: int) -> list[range]:
    """Prompt indices of each shard: [0, S), [S, 2 S), ..., the last one possibly shorter."""
    if count < 1 or shard_size < 1:
        raise ValueError(f"need count >= 1 and shard_size >= 1; got {count}, {shard_size}")
    return [range(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def rank_shards(num_shards: int, rank: int, world: int) -> list[int]:
    """The shards rank `rank` of `world` writes: k with k mod world = rank (balanced to within one shard)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need world >= 1 and 0 <= rank < world; got rank {rank}, world {world}")
    return list(range(rank, num_shards, world))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_info(index: int, prompts: range) -> ShardInfo:
    """The manifest entry of a written shard (every teacher shard has its prompt sidecar)."""
    return ShardInfo(f"{shard_name(index)}.safetensors", len(prompts), f"{shard_name(index)}.json")


def write_json(path: Path, value) -> None:
    """`value` as JSON in `path`, written under a temporary name and renamed into place."""
    write_json_atomically(path, value, indent=1, ensure_ascii=False)


def shard_is_written(folder: Path, index: int, prompts: range, verify: bool = True) -> bool:
    """Whether shard `index` is complete: its record names this prompt range and (`verify`) its files' SHA-256
    still match (a damaged or half-replaced file counts as not written)."""
    record_path = folder / f"{shard_name(index)}{RECORD_SUFFIX}"
    try:
        record = json.loads(record_path.read_text())
        if record["prompts"] != [prompts.start, prompts.stop]:
            return False
        info = shard_info(index, prompts)
        names = (info.file, info.prompts)
        return set(record["sha256"]) == set(names) and all(
            (folder / n).is_file() and (not verify or file_digest(folder / n) == record["sha256"][n]) for n in names
        )
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or foreign record
        return False


def write_teacher_shard(
    folder: Path, index: int, prompts: range, latents: torch.Tensor, text_embeddings: torch.Tensor, texts: list[str]
) -> ShardInfo:
    """Write shard `index` (rcmfn.shards format) and then its record; a crash before the record leaves a
    shard that `shard_is_written` reports as not written."""
    if not latents.shape[0] == text_embeddings.shape[0] == len(texts) == len(prompts):
        raise ValueError(
            f"shard {index}: {latents.shape[0]} latents, {text_embeddings.shape[0]} embeddings and {len(texts)} "
            f"prompts for the {len(prompts)} prompts {prompts.start}..{prompts.stop - 1}"
        )
    for what, tensor in (("latent", latents), ("text embedding", text_embeddings)):
        bad = (~torch.isfinite(tensor.flatten(1))).any(1).nonzero().flatten().tolist()
        if bad:  # a NaN sample would train silently on a masked loss
            raise ValueError(f"prompt {prompts[bad[0]]} ({texts[bad[0]][:60]!r}): its {what} holds non-finite values")
    (folder / f"{shard_name(index)}{RECORD_SUFFIX}").unlink(missing_ok=True)
    info = write_shard(folder, shard_name(index), latents, text_embeddings, list(texts))
    digests = {name: file_digest(folder / name) for name in (info.file, info.prompts)}
    record = {"prompts": [prompts.start, prompts.stop], "sha256": digests}
    write_json(folder / f"{shard_name(index)}{RECORD_SUFFIX}", record)
    return info


def any_shard_written(folder: Path) -> bool:
    """Whether `folder` holds any shard record (i.e. samples written under some settings)."""
    return any(folder.glob(f"shard-*{RECORD_SUFFIX}"))


def settings_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'name: saved vs now' for every setting that differs, nested keys joined by dots; the "paths" entry
    (where the teacher and the prompt file were read from) is a record, not a setting."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if key == "paths" and not prefix:
            continue
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += settings_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} vs now {new!r}")
    return out
