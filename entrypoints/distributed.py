"""`torchrun --nproc_per_node=N -m entrypoints.distill --model cosmos2b ...`: sharded rCM distillation.

Reading order: `DistributedConfig`, `check_before_gpu` (every error that needs no GPU), `run_distributed`
(build sharded networks, resume, loop, checkpoint, export), then parallel/parallelize.py.
"""

import json
import math
import os
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import tyro

from entrypoints.distill import DistillConfig, fingerprint, loop_config, prepare_output
from entrypoints.distributed_config import export_name
from entrypoints.presets import get_preset
from parallel import checkpoint
from parallel.context_parallel import check_cp_size
from parallel.fsdp import init_sharded_state, materialize, sharded_networks
from parallel.parallelize import ParallelConfig, ParallelDims, parallelize
from rcmfn.divergence import check_finite_weights
from rcmfn.loop import train_iteration
from rcmfn.metrics_log import MetricsLog
from rcmfn.models.checkpoint import export_checkpoint
from rcmfn.models.cosmos.configs import TINY_T2I
from rcmfn.models.cosmos.model import init_random_
from rcmfn.models.registry import build_model, cast_params, get_spec, trainable_spec
from rcmfn.models.wan.configs import WAN_TINY
from rcmfn.shards import ShardLoader, read_manifest, read_uncondition

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


ScaleConfig = DistillConfig  # DistillConfig carries the sharded settings in its `distributed` field


def model_spec(cfg):
    spec = get_spec(cfg.model)
    if cfg.distributed.tiny:
        spec = replace(spec, config=WAN_TINY if spec.family == "wan" else TINY_T2I, text_dim=24)
    return spec


def check_before_gpu(cfg, world_size: int):
    """Every configuration error that needs no GPU: mesh vs world size, CP vs heads and tokens, the
    teacher and the data, and a checkpoint written by another configuration. Returns (dims, spec, manifest)."""
    d = cfg.distributed
    dims = ParallelDims(world_size, d.dp_replicate, d.dp_shard, d.cp)
    spec = model_spec(cfg)
    if not d.random_init and (d.teacher is None or not d.teacher.exists()):
        raise ValueError(
            f"teacher checkpoint {d.teacher} not found (pass --distributed.teacher, or --distributed.random-init)"
        )
    layouts = {"--distributed.export-layouts": d.export_layouts if d.export else ()}
    layouts["--distributed.teacher-layout"] = () if d.random_init else (d.teacher_layout,)
    for flag, names in layouts.items():
        if unknown := [name for name in names if name not in spec.key_maps]:
            raise ValueError(f"{flag}: unknown key layout {unknown} for {cfg.model}; valid: {sorted(spec.key_maps)}")
    if d.data is None:
        raise ValueError("no training data: pass --distributed.data <shard folder>")
    manifest = read_manifest(d.data)
    channels = spec.config.in_dim if spec.family == "wan" else spec.config.in_channels
    if manifest.latent_shape[0] != channels or manifest.text_shape[1] != spec.text_dim:
        raise ValueError(
            f"data {d.data} holds latents {manifest.latent_shape} and text {manifest.text_shape}; "
            f"{cfg.model} takes {channels} latent channels and text width {spec.text_dim}"
        )
    check_cp_size(spec.family, spec.config, dims.cp, manifest.latent_shape)
    if manifest.count < d.batch_size * dims.dp:
        raise ValueError(f"{manifest.count} samples cannot fill one global batch of {d.batch_size} x {dims.dp}")
    ckpt = checkpoint.latest_checkpoint(cfg.output) if cfg.resume else None
    if ckpt is not None and checkpoint.read_meta(ckpt)["config"] != fingerprint(cfg):
        saved = checkpoint.read_meta(ckpt)["config"]
        diff = sorted(k for k in set(saved) | set(fingerprint(cfg)) if saved.get(k) != fingerprint(cfg).get(k))
        raise ValueError(
            f"checkpoint {ckpt} was written by another configuration (differs in {diff}); "
            "use a new output folder or the same settings"
        )
    return dims, spec, manifest


def token_count(spec, latent_shape) -> int:
    """Tokens of one sample: latent T H W over the patch (Wan patch_size, Cosmos patch_temporal/spatial)."""
    c = spec.config
    patch = c.patch_size if spec.family == "wan" else (c.patch_temporal, c.patch_spatial, c.patch_spatial)
    return math.prod(n // p for n, p in zip(latent_shape[1:], patch, strict=True))


def teacher_weights(cfg, spec) -> dict[str, torch.Tensor]:
    """Rank 0's full teacher state dict (CPU, release dtype), from the checkpoint or random."""
    d = cfg.distributed
    if not d.random_init:
        module, report = build_model(spec, d.teacher, d.teacher_layout, strict=d.strict, seed=cfg.seed)
        if not report.ok or report.initialised:
            print(f"non-strict teacher load (--distributed.no-strict):\n{report.describe()}", flush=True)
        return module.state_dict()
    torch.manual_seed(cfg.seed)
    module = build_model(spec, None, dtype=torch.bfloat16)[0]
    return (
        init_random_(module, torch.Generator().manual_seed(cfg.seed)) if spec.family == "cosmos" else module
    ).state_dict()


def build_network(spec, full_state, meshes, storage, pcfg, device, keep_fp32: bool = True):
    """Meta-built net: storage dtypes (fp32 patterns kept unless `keep_fp32` is off), CP/AC/compile/FSDP,
    then rank 0's weights."""
    module = cast_params(build_model(spec, None, device="meta")[0], storage, keep_fp32)
    return materialize(parallelize(module, meshes, pcfg), full_state, device)


def build_networks(spec, full_state, meshes, compute, pcfg, device, critic: bool, trainable=None):
    """(teacher, student, fake score or None) as the run trains them, the teacher frozen.

    Student and fake score keep float32 (float64) master weights that FSDP all-gathers in `compute`; they
    are built from `trainable` (default `trainable_spec(spec)`: the float32 time path, rCM paper §4.2).
    The teacher is built from `spec` and stored wholly in `compute`: its float32 tables too (Wan's time MLP
    and modulation), so at iteration 0 the trainable nets compute exactly what the teacher computes (for
    Cosmos up to the trainable nets' time path) -- and what the official trainer runs, which casts teacher,
    student and fake score wholly to bf16 (NVlabs/rcm rcm/models/t2v_model_distill_rcm.py:327-331).
    Guarded by tests/parallel/test_distributed.py::test_fake_score_and_student_start_bit_for_bit_as_the_teacher.
    """
    master = torch.float64 if compute == torch.float64 else torch.float32
    train_cfg = replace(pcfg, param_dtype=None if master == compute else compute)
    teacher = build_network(spec, full_state, meshes, compute, replace(train_cfg, param_dtype=None), device, False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    trainable = trainable_spec(spec) if trainable is None else trainable
    student = build_network(trainable, full_state, meshes, master, train_cfg, device)
    fake = build_network(trainable, full_state, meshes, master, train_cfg, device) if critic else None
    return teacher, student, fake


def run_distributed(cfg) -> dict:
    """Sharded distillation of `cfg` (DistillConfig fields + cfg.distributed) under torchrun."""
    d = cfg.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims, spec, manifest = check_before_gpu(cfg, world)
    prepare_output(cfg.output)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, meshes = dist.get_rank(), dims.build_meshes(device.type)
    lcfg = loop_config(cfg)
    lcfg = replace(lcfg, seed=lcfg.seed + meshes.dp_rank * 1_000_000_007)  # distinct draws per batch, shared in CP
    full_state = teacher_weights(cfg, spec) if rank == 0 else {}
    pcfg = ParallelConfig(ac=d.ac, compile=cfg.compile)
    critic = lcfg.loss.uses_critic
    teacher, student, fake = build_networks(spec, full_state, meshes, DTYPES[d.dtype], pcfg, device, critic)
    del full_state
    nets = sharded_networks(student, teacher, fake, spec.timestep_scale, lcfg)
    state = init_sharded_state(student, fake, lcfg)
    loader = ShardLoader(d.data, d.batch_size, meshes.dp_rank, meshes.dp_size, cfg.seed)
    ckpt = checkpoint.latest_checkpoint(cfg.output) if cfg.resume else None
    if ckpt is not None:
        loader.load_state_dict(checkpoint.load_checkpoint(ckpt, state, student, fake)["loader"])
    negative = read_uncondition(d.data)  # the negative prompt's embedding or zeros, as prepare recorded it
    uncond = negative.to(device).expand(d.batch_size, *negative.shape)

    def batch_fn(generator):
        batch = next(loader)
        return batch.latents.to(device, torch.float32), batch.text_embeddings.to(device), uncond

    total = cfg.iterations or get_preset(cfg.model).iterations
    stop_requested, meta = (
        checkpoint.sigterm_flag(),
        lambda: {"loader": loader.state_dict(), "config": fingerprint(cfg)},
    )
    tokens = token_count(spec, manifest.latent_shape) * d.batch_size * dims.dp  # per iteration, all ranks
    times: dict[str, list[float]] = {"student": [], "critic": []}
    log = MetricsLog(cfg.output / "metrics.jsonl", state.iteration) if rank == 0 else None
    while state.iteration < total:
        start = time.perf_counter()
        metrics = train_iteration(state, nets, batch_fn, lcfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        times[metrics["phase"]].append(seconds)
        metrics |= {"seconds": seconds, "tokens_per_s": tokens / seconds}
        if device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if log is not None and (metrics["iteration"] % cfg.log_every == 0 or state.iteration == total):
            log.write(metrics)
            if cfg.progress:
                print(
                    json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True
                )
        stop = checkpoint.agree_to_stop(stop_requested(), device)
        if stop or state.iteration % cfg.save_every == 0 or (state.iteration == total and d.save_at_end):
            check_finite_weights(
                {"student": state.student, "EMA": state.ema, "fake score": state.fake}, f"checkpoint {state.iteration}"
            )
            checkpoint.save_checkpoint(cfg.output, state, student, fake, meta(), d.keep_checkpoints)
        if stop:
            break
    if d.export:
        check_finite_weights({"EMA": state.ema}, "the EMA student's export")
    ema = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).to("cpu", torch.bfloat16) for k, v in state.ema.items()
    }
    summary = {
        "iteration": state.iteration,
        "stopped_by_signal": state.iteration < total,
        "mean_seconds": {k: sum(v[1:]) / max(len(v) - 1, 1) if v else math.nan for k, v in times.items()},
        "tokens_per_sample": tokens // (d.batch_size * dims.dp),
        "world": asdict(dims),
    }
    if rank == 0:
        for layout in d.export_layouts if d.export else ():
            export_checkpoint(ema, cfg.output / export_name(layout), spec.key_maps[layout])
        (cfg.output / "metrics.json").write_text(json.dumps(summary, indent=1))
        log.close()
    # Every rank waits for rank 0's export before tearing down. A rank that exits first could reach
    # interpreter finalisation while a gloo worker thread still drops its last collective's tensors;
    # taking the GIL there aborts the process ("terminate called without an active exception", the
    # mechanism pytorch#179291 describes; seen once in 20 CPU runs of the resume test).
    dist.barrier()
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    run_distributed(tyro.cli(ScaleConfig, description=__doc__.splitlines()[0]))
