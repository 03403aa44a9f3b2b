"""The sharded run's networks: the teacher's weights (checkpoint or random), and teacher, student and fake
score built on meta, parallelised (CP, AC, compile, FSDP2) and filled from rank 0's weights.
"""

from dataclasses import replace

import torch

from entrypoints.expert_run import expert_teacher
from parallel.fsdp import materialize
from parallel.parallelize import parallelize
from rcmfn.lora import LoraConfig, adapted_keys, add_fully_trained, fully_trained_keys, init_adapters
from rcmfn.lora_linear import adapt_module, is_adapter, with_adapters
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


def build_lora_network(spec, full_state, adapters, meshes, compute, master, pcfg, device, lora: LoraConfig):
    """A trainable net as frozen weights plus LoRA adapters (rcmfn/lora_linear.py), built on meta: the frozen
    weights stored wholly in `compute` as the teacher's (no float32 master copy of what never steps: 2 bytes
    a weight in bf16 instead of 4), the adapters in `master`; then CP/AC/compile/FSDP and rank 0's weights
    with the adapters `adapters` (rank 0; {} elsewhere). FSDP2 requires a uniform dtype among the trainable
    parameters of a unit only (the adapters), and all-gathers every parameter in `compute`."""
    module = cast_params(build_model(spec, None, device="meta")[0], compute, keep_fp32=False)
    adapted = adapt_module(module, spec.lora_targets, lora)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters() if not is_adapter(name)}
    trained = set(fully_trained_keys(shapes, lora.full, adapted))  # LoRA's tensors trained in full, if any
    for name, p in module.named_parameters():
        if is_adapter(name) or name in trained:
            p.data = p.data.to(master)
        p.requires_grad_(is_adapter(name) or name in trained)
    full = dict(full_state) | with_adapters({}, adapters)
    return materialize(parallelize(module, meshes, pcfg), full, device)


def initial_adapters(spec, full_state, lora: LoraConfig, seed: int):
    """Rank 0's fresh adapter set for `spec` (the student's and the fake score's start), drawn from (seed, 1)."""
    module = build_model(spec, None, device="meta")[0]
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    keys = adapted_keys(shapes, spec.lora_targets, lora.targets, lora.rank)
    adapters = init_adapters(shapes, keys, lora.rank, torch.Generator().manual_seed(seed * 1_000_003 + 1))
    return add_fully_trained(adapters, shapes, full_state, lora)  # the build casts them to master


def build_networks(
    spec, full_state, meshes, compute, pcfg, device, critic: bool, trainable=None, lora=None, lora_seed=0
):
    """(teacher, student, fake score or None) as the run trains them, the teacher frozen.

    Student and fake score keep float32 (float64) master weights that FSDP all-gathers in `compute`; they
    are built from `trainable` (default `trainable_spec(spec)`: the float32 time path, rCM paper §4.2).
    The teacher is built from `spec` and stored wholly in `compute`: its float32 tables too (Wan's time MLP
    and modulation), so at iteration 0 the trainable nets compute exactly what the teacher computes (for
    Cosmos up to the trainable nets' time path) -- and what the official trainer runs, which casts teacher,
    student and fake score wholly to bf16 (NVlabs/rcm rcm/models/t2v_model_distill_rcm.py:327-331).
    Guarded by tests/parallel/test_distributed.py::test_fake_score_and_student_start_bit_for_bit_as_the_teacher.
    With `lora` enabled, student and fake score are the teacher's weights plus adapters (`build_lora_network`),
    both starting from the same fresh set (`initial_adapters`, seeded by `lora_seed`).
    """
    master = torch.float64 if compute == torch.float64 else torch.float32
    train_cfg = replace(pcfg, param_dtype=None if master == compute else compute)
    teacher = build_network(spec, full_state, meshes, compute, replace(train_cfg, param_dtype=None), device, False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    trainable = trainable_spec(spec) if trainable is None else trainable
    if lora is not None and lora.enabled:
        adapters = initial_adapters(trainable, full_state, lora, lora_seed) if full_state else {}
        net = lambda: build_lora_network(
            trainable, full_state, adapters, meshes, compute, master, train_cfg, device, lora
        )  # noqa: E731
    else:
        net = lambda: build_network(trainable, full_state, meshes, master, train_cfg, device)  # noqa: E731
    student = net()
    fake = net() if critic else None
    return teacher, student, fake
