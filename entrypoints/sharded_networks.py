"""The sharded run's networks: the teacher's weights (checkpoint or random), and teacher, student and fake
score built on meta, parallelised (CP, AC, compile, FSDP2) and filled from rank 0's weights.
"""

from dataclasses import replace

import torch

from entrypoints.expert_run import expert_teacher
from parallel.fsdp import materialize
from parallel.parallelize import parallelize
from rcmfn.models.registry import build_model, cast_params, random_model, trainable_spec


def teacher_weights(cfg, spec) -> dict[str, torch.Tensor]:
    """Rank 0's full teacher state dict (CPU, release dtype), from the checkpoint or random."""
    d = cfg.distributed
    if not d.random_init:
        path = expert_teacher(d.teacher, d.teacher_layout, cfg.model, cfg.expert)  # a two-expert model's one
        module, report = build_model(spec, path, d.teacher_layout, strict=d.strict, seed=cfg.seed)
        if not report.ok or report.initialised:
            print(f"non-strict teacher load (--distributed.no-strict):\n{report.describe()}", flush=True)
        return module.state_dict()
    return random_model(spec, torch.bfloat16, seed=cfg.seed).state_dict()


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
