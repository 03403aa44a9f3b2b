"""`python -m entrypoints.prepare --from-teacher`: training shards sampled from the teacher, the data the
official runs distil on (SPEC-rcm §11.1, Errata), instead of encoded media.

Every prompt of --prompt-file is encoded by the text encoder as prepare encodes captions; the teacher samples
its latent with entrypoints.sample's Euler sampler (rcmfn.samplers.teacher_euler_sample: CFG with the standard
weight --guidance, --shift, --sigma-max, --steps; SPEC-rcm §6.2) from noise seeded by (--seed, prompt index),
conditioned on the stored embedding and the stored uncondition, exactly the tensors distill's teacher is
given. Under torchrun, rank r writes the shards k with k mod W = r (rcmfn/teacher_data.py); a restart skips
the shards whose records and checksums verify and rewrites the others, so every run of the same settings
writes the same bits. teacher.json records the settings (teacher checkpoint path and SHA-256, steps,
guidance, shift, sigma_max, seed, uncondition, prompt file SHA-256); samples written with other settings
are refused unless --overwrite. Rank 0 lists the shards in manifest.json once every rank is done.
"""

import contextlib
import json
import os
import shutil
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from entrypoints.run_folder import prepare_output
from entrypoints.sample import synced
from entrypoints.teacher_data_config import sampler_settings
from entrypoints.teacher_load import load_teacher
from parallel.checkpoint import rank_zero_first
from rcmfn import codecs
from rcmfn.checksums import file_digest, folder_digests
from rcmfn.models.registry import ModelSpec, get_spec, unconditional_prompt
from rcmfn.run_lock import run_lock
from rcmfn.samplers import teacher_rf_times
from rcmfn.shards import (
    DTYPES,
    MANIFEST,
    Manifest,
    read_manifest,
    read_uncondition,
    write_manifest,
    write_negative_embedding,
    write_zero_uncondition,
)
from rcmfn.teacher_data import (
    SETTINGS,
    any_shard_written,
    prompt_noise,
    rank_shards,
    read_prompt_file,
    settings_differences,
    shard_info,
    shard_is_written,
    shard_ranges,
    write_json,
    write_teacher_shard,
)

DATASET_FILES = (MANIFEST, "negative.safetensors", SETTINGS, "toy.json", "prepare_progress.json", "shard-*")


def latent_shape(cfg, spec: ModelSpec) -> tuple[int, int, int, int]:
    frames, height, width = spec.pixel_shape  # the model's training size, as prepare's media path
    return codecs.latent_shape(
        cfg.frames or frames, cfg.height or height, cfg.width or width, spec.vae_stride, spec.channels
    )


def teacher_settings(cfg, spec: ModelSpec) -> dict:
    """Everything that decides the samples, as teacher.json records it (rank 0: hashes the teacher)."""
    t = cfg.teacher_data
    guidance, shift, sigma_max = sampler_settings(cfg)
    teacher_spec = spec if t.teacher_model in (None, cfg.model) else get_spec(t.teacher_model)
    if (switch := teacher_spec.experts) is not None:  # two experts: both weights and the boundary
        g = (switch.guidance_high, switch.guidance_low) if t.guidance is None else (t.guidance, t.guidance)
        guidance = {"high": g[0], "low": g[1], "boundary": switch.boundary}
    digest = None
    if t.teacher is not None:
        digest = folder_digests(t.teacher) if t.teacher.is_dir() else file_digest(t.teacher)
    negative = unconditional_prompt(spec, cfg.negative_prompt)
    return {
        "model": cfg.model,
        "teacher": {"model": t.teacher_model or cfg.model, "sha256": digest, "random_init": t.random_teacher},
        "teacher_layout": t.teacher_layout,
        "teacher_dtype": t.teacher_dtype,
        "sampler": {"name": "euler", "steps": t.steps, "guidance": guidance, "shift": shift, "sigma_max": sigma_max},
        "seed": cfg.seed,
        "uncondition": "zeros" if negative is None else "negative_prompt",
        "negative_prompt": negative,
        "prompts": {"sha256": file_digest(t.prompt_file), "truncate": cfg.truncate_prompts},
        "latent_shape": list(latent_shape(cfg, spec)),
        "text_shape": [spec.text_len, spec.text_dim],
        "dtype": cfg.dtype or "bfloat16",
        "shard_size": cfg.shard_size,
        "paths": {"teacher": str(t.teacher), "prompt_file": str(t.prompt_file), "text_encoder": str(cfg.text_encoder)},
    }


def open_output(cfg, spec: ModelSpec, encoder, held: contextlib.ExitStack) -> dict:
    """Rank 0, before any rank samples: lock --output until `held` closes; refuse samples of other settings
    (with --overwrite: delete them); record the settings, the manifest (shards listed at the end) and the
    uncondition. Settings that changed before any shard was written are replaced without asking."""
    prepare_output(cfg.output)
    held.enter_context(run_lock(cfg.output))
    settings, saved = teacher_settings(cfg, spec), cfg.output / SETTINGS
    written, problem = any_shard_written(cfg.output), None
    if saved.exists() and written:
        if diff := settings_differences(json.loads(saved.read_text()), settings):
            problem = f"{cfg.output} holds teacher samples written with other settings ({'; '.join(diff)})"
    elif not saved.exists() and (written or (cfg.output / MANIFEST).exists()):
        problem = f"{cfg.output} holds a dataset without {SETTINGS} (not written by --from-teacher)"
    if problem and not cfg.teacher_data.overwrite:
        raise ValueError(f"{problem}; use another --output, the same settings, or --overwrite to delete it")
    if problem or not written:  # a fresh start: no file of another dataset or of other settings stays
        for path in {p for pattern in DATASET_FILES for p in cfg.output.glob(pattern)}:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_json(saved, settings)
    if not (cfg.output / MANIFEST).exists():
        dtype, shape = settings["dtype"], tuple(settings["latent_shape"])
        write_manifest(Manifest(cfg.output, shape, tuple(settings["text_shape"]), dtype, (), None))
    if settings["negative_prompt"] is None:
        write_zero_uncondition(cfg.output)
    else:
        negative = encoder.encode([settings["negative_prompt"]], what="negative prompt")[0]
        write_negative_embedding(cfg.output, negative.float().cpu())
    return settings


def write_rank_shards(cfg, spec: ModelSpec, prompts: list[str], encoder, rank: int, world: int, device) -> dict:
    """Rank `rank` of `world`: sample and write each of its shards that is not written yet (after open_output)."""
    t, dtype = cfg.teacher_data, DTYPES[cfg.dtype or "bfloat16"]
    plan = shard_ranges(len(prompts), cfg.shard_size)
    mine = rank_shards(len(plan), rank, world)
    todo = [k for k in mine if not shard_is_written(cfg.output, k, plan[k])]
    result = {"rank": rank, "world": world, "shards": len(mine), "skipped_shards": len(mine) - len(todo)}
    result |= {"written": sum(len(plan[k]) for k in todo), "seconds": 0.0}
    if not todo:
        return result
    sample = load_teacher(cfg, spec, device)
    _, shift, sigma_max = sampler_settings(cfg)
    rf_times, shape = teacher_rf_times(t.steps, shift, sigma_max), latent_shape(cfg, spec)
    uncond = read_uncondition(cfg.output).to(device)  # what distill's teacher will be given
    start = synced(device)
    desc = f"teacher samples, rank 0 of {world}"
    with tqdm(total=result["written"], disable=not (cfg.progress and rank == 0), desc=desc) as bar:
        for k in todo:
            latents, embeddings = [], []
            for first in range(plan[k].start, plan[k].stop, t.batch):
                chunk = range(first, min(first + t.batch, plan[k].stop))
                text = torch.stack([encode(encoder, prompts[i], cfg.truncate_prompts) for i in chunk]).to(dtype)
                cond = text.to(device)
                noise = prompt_noise(shape, cfg.seed, chunk).to(device)
                x0 = sample(noise, rf_times, cond, uncond.expand_as(cond))
                latents.append(x0.to("cpu", dtype))
                embeddings.append(text)
                bar.update(len(chunk))
            shard_prompts = prompts[plan[k].start : plan[k].stop]
            write_teacher_shard(cfg.output, k, plan[k], torch.cat(latents), torch.cat(embeddings), shard_prompts)
    result["seconds"] = synced(device) - start
    return result


def encode(encoder, prompt: str, truncate: bool) -> torch.Tensor:
    """One prompt's text embedding [L, D] on the CPU in float32, as prepare encodes a caption."""
    return encoder.encode([prompt], truncate=truncate, what="prompt")[0].float().cpu()


def finish_output(cfg, num_prompts: int) -> Manifest:
    """Rank 0, after every rank: check that every shard has its record and list the shards in the manifest.
    The checksums were verified (or the files written) by their ranks in this job: not hashed again here."""
    plan = shard_ranges(num_prompts, cfg.shard_size)
    missing = [k for k, prompts in enumerate(plan) if not shard_is_written(cfg.output, k, prompts, verify=False)]
    if missing:
        raise RuntimeError(f"{cfg.output}: shards {missing[:10]} of {len(plan)} are not written; run the job again")
    manifest = read_manifest(cfg.output, check_files=False)
    write_manifest(replace(manifest, shards=tuple(shard_info(k, prompts) for k, prompts in enumerate(plan))))
    return read_manifest(cfg.output)


def prepare_from_teacher(cfg, spec: ModelSpec) -> dict:
    """The whole job on this rank (torchrun: RANK / WORLD_SIZE; else one process): checks, encoder, rank 0's
    open_output, this rank's shards, and rank 0's manifest once every rank is done."""
    t = cfg.teacher_data
    if spec.family.image_condition is not None:  # the teacher would need an image per prompt
        raise ValueError(f"--from-teacher does not sample image-to-video models ({cfg.model}) yet; use --input")
    prompts = read_prompt_file(t.prompt_file)
    if t.teacher is not None and not t.teacher.exists():  # before minutes of loading, not after
        raise FileNotFoundError(f"teacher checkpoint not found: {t.teacher}")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per rank
    device = torch.device(cfg.device or (local if torch.cuda.is_available() else "cpu"))
    encoder = codecs.load_text_encoder(cfg.text_encoder, device, torch.bfloat16, spec.text_len)
    if encoder.dim != spec.text_dim:
        raise ValueError(f"text encoder width {encoder.dim} != {cfg.model}'s text width {spec.text_dim}")
    if not cfg.truncate_prompts:
        encoder.check_lengths(prompts, what="prompt")  # a skipped prompt would leave a gap in the indices
    own_group = world > 1 and not dist.is_initialized()
    if own_group:  # gloo: barriers only; the last rank may finish a shard's worth of samples after the first
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        with contextlib.ExitStack() as held:
            settings = rank_zero_first(lambda: open_output(cfg, spec, encoder, held))
            result = write_rank_shards(cfg, spec, prompts, encoder, rank, world, device)
            if world > 1:
                dist.barrier()
            manifest = rank_zero_first(lambda: finish_output(cfg, len(prompts)))
        if world > 1:  # no rank tears down while gloo still works for another (entrypoints/distributed.py)
            dist.barrier()
    finally:
        if own_group:
            dist.destroy_process_group()
    rate = 3600 * result["written"] / result["seconds"] if result["seconds"] else None
    return result | {"settings": settings, "manifest": manifest, "samples_per_hour": rate}


def describe_teacher_result(cfg, result: dict) -> str:
    """The line `prepare` prints on rank 0 at the end: what was written, the throughput, the dataset."""
    manifest, rate = result["manifest"], result["samples_per_hour"]
    speed = f"{rate:.1f} samples/hour on this rank's device" if rate else "nothing left to sample"
    return (
        f"{cfg.output}: {result['written']} teacher samples written now by rank 0 of {result['world']} "
        f"({result['skipped_shards']} of its {result['shards']} shards already complete; {speed}); "
        f"{manifest.count} in {len(manifest.shards)} shards, latent {list(manifest.latent_shape)}, "
        f"uncondition {manifest.uncondition}; settings in {cfg.output / SETTINGS}"
    )
