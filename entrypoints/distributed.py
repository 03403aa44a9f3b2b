"""`torchrun --nproc_per_node=N -m entrypoints.distill --model cosmos2b ...`: sharded rCM distillation.

Reading order: `DistributedConfig`, `check_before_gpu` (every error that needs no GPU), `run_distributed`
(process group, output folder lock), `train_sharded` (build sharded networks, resume, loop, checkpoint,
export), then parallel/parallelize.py.
"""

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from entrypoints.config import fingerprint, lora_config, run_stages, total_iterations
from entrypoints.expert_run import check_expert, expert_teacher
from entrypoints.image_condition import image_fraction_of, training_condition
from entrypoints.run_exports import DIFFUSERS_FOLDER, write_exports
from entrypoints.run_folder import check_fresh_output, check_resume_length, prepare_output, single_process_group_env
from entrypoints.sharded_networks import build_network, build_networks, teacher_weights  # noqa: F401 (re-exported)
from entrypoints.stop_signal import StopSignal, stop_signals
from parallel import checkpoint
from parallel.block_jvp import eager_tangent_blocks
from parallel.context_parallel import check_cp_size
from parallel.mesh import ParallelDims
from parallel.parallelize import ParallelConfig
from parallel.sharded_training import init_sharded_state, sharded_networks
from rcmfn.atomic import write_json_atomically
from rcmfn.condition import with_text
from rcmfn.divergence import check_finite_weights
from rcmfn.metrics_log import MetricsLog
from rcmfn.models.registry import get_spec
from rcmfn.run_lock import run_lock
from rcmfn.shards import ShardLoader, read_manifest, read_uncondition
from rcmfn.stages import check_stage_record, stage_record, staged_iteration
from rcmfn.train_checkpoint import config_differences

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def check_before_gpu(cfg, world_size: int):
    """Every configuration error that needs no GPU: mesh vs world size, CP vs heads and tokens, the
    teacher and the data, a checkpoint written by another configuration or past the requested length, and
    (for a fresh run) another run's checkpoints without --overwrite. Returns (dims, spec, manifest)."""
    d = cfg.distributed
    dims = ParallelDims(world_size, d.dp_replicate, d.dp_shard, d.cp)
    spec = get_spec(cfg.model)
    check_expert(cfg.model, cfg.expert, require=True)
    if not d.random_init and (d.teacher is None or not d.teacher.exists()):
        raise ValueError(
            f"teacher checkpoint {d.teacher} not found (pass --distributed.teacher, or --distributed.random-init)"
        )
    if not d.random_init:  # a two-expert model's run: its expert's folder must be there (named if not)
        expert_teacher(d.teacher, d.teacher_layout, cfg.model, cfg.expert)
    layouts = {"--distributed.export-layouts": d.export_layouts if d.export else ()}
    layouts["--distributed.teacher-layout"] = () if d.random_init else (d.teacher_layout,)
    for flag, names in layouts.items():
        known = set(spec.key_maps) | ({DIFFUSERS_FOLDER} if flag == "--distributed.export-layouts" else set())
        if unknown := [name for name in names if name not in known]:
            raise ValueError(f"{flag}: unknown key layout {unknown} for {cfg.model}; valid: {sorted(spec.key_maps)}")
    if DIFFUSERS_FOLDER in layouts["--distributed.export-layouts"]:
        spec.diffusers_config()  # names a family without a diffusers class
    if d.data is None:
        raise ValueError("no training data: pass --distributed.data <shard folder>")
    manifest = read_manifest(d.data)
    if manifest.latent_shape[0] != spec.channels or manifest.text_shape[1] != spec.text_dim:
        raise ValueError(
            f"data {d.data} holds latents {manifest.latent_shape} and text {manifest.text_shape}; "
            f"{cfg.model} takes {spec.channels} latent channels and text width {spec.text_dim}"
        )
    if (spec.family.image_condition is not None) != bool(manifest.conditions):
        raise ValueError(
            f"data {d.data} holds conditions {dict(manifest.conditions) or 'none'}; {cfg.model} "
            + (
                "needs an image condition (prepare with --image-encoder)"
                if manifest.conditions == ()
                else "takes text only"
            )
        )
    check_cp_size(spec, dims.cp, manifest.latent_shape)
    if manifest.count < d.batch_size * dims.dp:
        raise ValueError(f"{manifest.count} samples cannot fill one global batch of {d.batch_size} x {dims.dp}")
    ckpt = checkpoint.latest_checkpoint(cfg.output) if cfg.resume else None
    if ckpt is None:  # a fresh run; with --overwrite, rank 0 removes the old checkpoints under the lock
        check_fresh_output(cfg.output, cfg.overwrite)
        return dims, spec, manifest
    if diff := config_differences(checkpoint.read_meta(ckpt)["config"], fingerprint(cfg)):
        raise ValueError(
            f"checkpoint {ckpt} was written by another configuration ({', '.join(diff)}); "
            "use a new output folder or the same settings"
        )
    check_resume_length(ckpt, checkpoint.read_meta(ckpt)["iteration"], total_iterations(cfg))
    check_stage_record(checkpoint.read_meta(ckpt), run_stages(cfg)[0], str(ckpt))
    return dims, spec, manifest


def take_output(cfg, held: contextlib.ExitStack) -> tuple[str, Path | None]:
    """Rank 0, before any rank writes: create the output folder and lock it until `held` closes; a fresh run
    removes the old checkpoints (--overwrite; refused otherwise). Returns the run id (the resumed one's, or
    new) and the checkpoint to resume: the newest whose checksums verify (parallel.checkpoint)."""
    prepare_output(cfg.output)
    held.enter_context(run_lock(cfg.output))
    ckpt = checkpoint.newest_sound_checkpoint(cfg.output) if cfg.resume else None
    if ckpt is None:  # checked again here, under the lock: what rank 0 removes is what it found
        for old in check_fresh_output(cfg.output, cfg.overwrite):
            shutil.rmtree(old)
        return uuid.uuid4().hex, None
    return checkpoint.read_meta(ckpt).get("run_id") or uuid.uuid4().hex, ckpt  # older ones have no run id


def run_distributed(cfg) -> dict:
    """Sharded distillation of `cfg` (DistillConfig fields + cfg.distributed), under torchrun or as one
    process: the checks, the process group, the output folder's lock (held by rank 0 for the whole job),
    training, teardown."""
    if "RANK" not in os.environ:
        single_process_group_env()
    dims, spec, manifest = check_before_gpu(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    device = join_process_group()
    with contextlib.ExitStack() as held:
        run_id, ckpt = checkpoint.rank_zero_first(lambda: take_output(cfg, held))  # a refusal: on every rank
        prepare_output(cfg.output)  # every rank writes there (its DCP shards), not only rank 0
        stop = held.enter_context(stop_signals())  # SIGTERM / Ctrl-C: save at the next iteration boundary
        summary = train_sharded(cfg, dims, spec, manifest, device, run_id, ckpt, stop)
        # Every rank waits for rank 0's export before tearing down. A rank that exits first could reach
        # interpreter finalisation while a gloo worker thread still drops its last collective's tensors;
        # taking the GIL there aborts the process ("terminate called without an active exception", the
        # mechanism pytorch#179291 describes; seen once in 20 CPU runs of the resume test).
        dist.barrier()
    dist.destroy_process_group()
    return summary


def join_process_group() -> torch.device:
    """This rank's device (its local GPU, else the CPU) and the default process group on it."""
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def train_sharded(
    cfg, dims: ParallelDims, spec, manifest, device: torch.device, run_id: str, ckpt: Path | None, stop: StopSignal
) -> dict:
    """Build the sharded networks, resume, train, checkpoint, export (rank 0); return the summary."""
    d = cfg.distributed
    rank, meshes = dist.get_rank(), dims.build_meshes(device.type)
    stages, configs = run_stages(cfg)
    rank_seed = meshes.dp_rank * 1_000_000_007  # distinct draws per batch, shared in CP
    configs = tuple(replace(c, seed=c.seed + rank_seed) for c in configs)
    lcfg, critic = configs[-1], any(c.loss.uses_critic for c in configs)  # optimiser, tangent: one per run
    full_state = teacher_weights(cfg, spec) if rank == 0 else {}
    pcfg = ParallelConfig(ac=d.ac, compile=cfg.compile, allow_eager_tangent=d.allow_eager_tangent)
    lora = lora_config(cfg)
    teacher, student, fake = build_networks(
        spec, full_state, meshes, DTYPES[d.dtype], pcfg, device, critic, lora=lora, lora_seed=cfg.seed
    )
    del full_state
    nets = sharded_networks(student, teacher, fake, spec.timestep_scale, lcfg, lora_full=lora.full)
    state = init_sharded_state(student, fake, lcfg, lora.full)
    loader = ShardLoader(d.data, d.batch_size, meshes.dp_rank, meshes.dp_size, cfg.seed)
    if ckpt is not None:
        loader.load_state_dict(checkpoint.load_checkpoint(ckpt, state, student, fake)["loader"])
    negative = read_uncondition(d.data)  # the negative prompt's embedding or zeros, as prepare recorded it
    negative = negative.to(device)

    image_fraction = image_fraction_of(cfg)

    def batch_fn(generator):
        batch = next(loader)
        latents, text = batch.latents.to(device, torch.float32), batch.text_embeddings.to(device)
        stored = {name: tensor.to(device) for name, tensor in batch.conditions.items()}  # e.g. Wan I2V's image
        cond = training_condition(spec, text, latents, stored, image_fraction, generator)
        return latents, cond, with_text(cond, negative)  # CFG drops the text only

    total = total_iterations(cfg)

    def meta() -> dict:  # what a checkpoint records beside the tensors
        return {"loader": loader.state_dict(), "config": fingerprint(cfg)} | stage_record(state.iteration, stages)

    tokens = spec.tokens(manifest.latent_shape) * d.batch_size * dims.dp  # per iteration, all ranks
    times: dict[str, list[float]] = {"student": [], "critic": []}
    log = MetricsLog(cfg.output / "metrics.jsonl", state.iteration) if rank == 0 else None
    while state.iteration < total:
        stop.iteration, start = state.iteration, time.perf_counter()
        metrics = staged_iteration(state, nets, batch_fn, stages, configs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        times[metrics["phase"]].append(seconds)
        metrics |= {"seconds": seconds, "tokens_per_s": tokens / seconds}
        if cfg.compile and (eager := eager_tangent_blocks(student)):
            metrics["eager_tangent_blocks"] = eager  # allowed by --distributed.allow-eager-tangent
        if device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if log is not None and (metrics["iteration"] % cfg.log_every == 0 or state.iteration == total):
            log.write(metrics)
            if cfg.progress:
                print(
                    json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True
                )
        stopping = checkpoint.agree_to_stop(stop(), device)
        if stopping or state.iteration % cfg.save_every == 0 or (state.iteration == total and d.save_at_end):
            check_finite_weights(
                {"student": state.student, "EMA": state.ema, "fake score": state.fake}, f"checkpoint {state.iteration}"
            )
            save = lambda: checkpoint.save_checkpoint(  # noqa: E731
                cfg.output, state, student, fake, meta(), run_id, d.keep_checkpoints
            )
            stop.timed_save(save)
        if stopping:
            break
    if d.export:
        check_finite_weights({"EMA": state.ema}, "the EMA student's export")
    kept = torch.float32 if lora.enabled else torch.bfloat16  # LoRA: the adapters stay float32 until merged
    ema = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).to("cpu", kept) for k, v in state.ema.items()}
    summary = {
        "iteration": state.iteration,
        "stopped_by_signal": state.iteration < total,
        "mean_seconds": {k: sum(v[1:]) / max(len(v) - 1, 1) if v else math.nan for k, v in times.items()},
        "tokens_per_sample": tokens // (d.batch_size * dims.dp),
        "world": asdict(dims),
    }
    if rank == 0:
        if d.export:
            write_exports(cfg, spec, ema, lora, d.export_layouts)
        write_json_atomically(cfg.output / "metrics.json", summary, indent=1)
        log.close()
    return summary
