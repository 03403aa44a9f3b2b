"""The toy run of `python -m entrypoints.distill` (no --model): resume, train, checkpoint, evaluate.

Reading order: `run_toy`, then rcmfn/loop.py. Called by entrypoints/distill.py `run` inside the output
folder's lock (rcmfn/run_lock.py).
"""

import copy
import json
import shutil
import sys
import time
import uuid
from dataclasses import replace

import torch
from tensordict import TensorDict
from tqdm.auto import tqdm

from entrypoints import toy as toy_world
from entrypoints.config import DistillConfig, fingerprint, lora_config, mid_times, run_stages, total_iterations
from entrypoints.presets import get_preset
from entrypoints.run_folder import check_fresh_output, check_resume_length
from entrypoints.stop_signal import stop_signals
from rcmfn.compile import compiled
from rcmfn.divergence import check_finite_weights
from rcmfn.loop import LoopConfig, Networks, init_state
from rcmfn.lora import LoraConfig, add_fully_trained, init_adapters, merge
from rcmfn.lora_linear import adapt_module, lora_denoiser
from rcmfn.metrics_log import MetricsLog
from rcmfn.precond import trigflow_denoiser
from rcmfn.stages import check_stage_record, stage_record, staged_iteration
from rcmfn.tangent import scm_tangent
from rcmfn.toy.tiny_dit import LORA_TARGETS, velocity_net
from rcmfn.train_checkpoint import (
    check_checkpoint_config,
    load_checkpoint,
    newest_sound_checkpoint,
    remove_partial_saves,
    save_checkpoint,
)


def run_toy(cfg: DistillConfig) -> dict:
    """The toy run of `run`, inside the output folder's lock."""
    remove_partial_saves(cfg.output)  # left by a killed save; no other job writes here (the lock)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    stages, configs = run_stages(cfg)
    lcfg, critic = configs[-1], any(c.loss.uses_critic for c in configs)  # optimiser, tangent: one per run
    config = fingerprint(cfg)
    total = total_iterations(cfg)
    ckpt = newest_sound_checkpoint(cfg.output) if cfg.resume else None
    if ckpt is not None:  # check before the warm start so a mismatch fails fast and touches nothing
        resumed = check_checkpoint_config(ckpt, config)
        check_resume_length(ckpt, resumed["iteration"], total)
        check_stage_record(resumed, stages, str(ckpt))
    else:
        resumed = {}
        for old in check_fresh_output(cfg.output, cfg.overwrite):
            shutil.rmtree(old)
    run_id = resumed.get("run_id") or uuid.uuid4().hex  # kept across resumes; pruning removes only its own
    world = toy_world.build_toy(cfg.toy, cfg.seed, cfg.progress)
    lora = lora_config(cfg)
    student, start = lora_student(world, lora, cfg.seed) if lora.enabled else (world.student, world.init_params)
    nets = Networks(
        student=student,
        teacher=world.teacher,
        teacher_params=world.mixture,
        fake=student if critic else None,
    )
    if cfg.compile:
        nets = compiled_networks(nets, lcfg)
    state = init_state(start, start if critic else None, lcfg)
    if ckpt is not None:
        state = load_checkpoint(ckpt, state, config)
    (cfg.output / "config.json").write_text(json.dumps(config, indent=2))
    batch_fn = toy_world.toy_batch_fn(world)
    bar = tqdm(
        total=total, initial=state.iteration, disable=not cfg.progress, desc=f"{cfg.stages or cfg.method} distill"
    )
    start, first = time.perf_counter(), state.iteration
    with MetricsLog(cfg.output / "metrics.jsonl", state.iteration) as log, stop_signals() as stop:
        while state.iteration < total and not stop():
            stop.iteration = state.iteration
            metrics = staged_iteration(state, nets, batch_fn, stages, configs)
            bar.update(1)
            rate = (state.iteration - first) / (time.perf_counter() - start)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k.endswith("loss")} | {"it/s": f"{rate:.1f}"})
            if metrics["iteration"] % cfg.log_every == 0:
                log.write(metrics)
            if stop() or state.iteration % cfg.save_every == 0 or state.iteration == total:
                check_finite_weights(
                    {"student": state.student, "EMA": state.ema, "fake score": state.fake},
                    f"checkpoint {state.iteration}",
                )
                save = lambda: save_checkpoint(  # noqa: E731
                    cfg.output, state, config, run_id, record=stage_record(state.iteration, stages)
                )
                stop.timed_save(save)
    bar.close()
    if stop():
        print(f"stopped at iteration {state.iteration}, checkpoint saved; the same command resumes", file=sys.stderr)
        return {"iteration": state.iteration, "stopped_by_signal": True}
    preset = get_preset(cfg.model)
    ema = TensorDict(merge(world.init_params, state.ema, lora.alpha), batch_size=[]) if lora.enabled else state.ema
    final, figure = toy_world.final_report(world, ema, cfg.seed, lcfg.loss.guidance, preset.sigma_max, mid_times(cfg))
    final |= world.warm_start_report | {"train_seconds": time.perf_counter() - start, "iterations": total}
    (cfg.output / "metrics.json").write_text(json.dumps(final, indent=2))
    toy_world.save_sets_figure(world, figure, cfg.output / "samples.png")
    return final


def lora_student(world: toy_world.ToyWorld, lora: LoraConfig, seed: int) -> tuple:
    """(the student as a denoiser over adapters on the frozen warm-started weights, its fresh adapters).

    Student and fake score both start from these adapters (each trains its own copy), as both start from
    the warm start in full fine-tuning; the adapters are drawn from their own generator (seed, 1). The
    tensors `lora.full` trains in full join the set as copies of the warm start's.
    """
    module = copy.deepcopy(world.module)
    keys = adapt_module(module, LORA_TARGETS, lora)
    shapes = {k: tuple(v.shape) for k, v in world.init_params.items()}
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 1)
    adapters = init_adapters(shapes, keys, lora.rank, generator, world.init_params["patch_embed.weight"].dtype)
    adapters = add_fully_trained(adapters, shapes, world.init_params, lora)  # --lora-full: from the warm start
    frozen = {k: v.detach() for k, v in world.init_params.items()}
    return lora_denoiser(trigflow_denoiser(velocity_net(module), net_dtype=torch.float32), frozen), adapters


def compiled_networks(nets: Networks, cfg: LoopConfig, backend: str = "inductor") -> Networks:
    """Compile at the call site: the student forward, and the whole jvp (torch.func.jvp cannot run over
    an already-compiled function, so the tangent computation is compiled as one function)."""
    tangent = lambda p, x, t, c, f: scm_tangent(nets.student, p, x, t, c, f, cfg.loss.tangent_method)  # noqa: E731
    return replace(
        nets,
        student_tangent=compiled(tangent, backend),
        student=compiled(nets.student, backend),
    )
