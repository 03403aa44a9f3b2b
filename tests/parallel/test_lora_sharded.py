"""Sharded LoRA students and fake scores equal the single-process LoRA run (gloo on the CPU, float64):
FSDP over 2 ranks and Ulysses CP over 2, losses, grad norms, the sCM tangent and every adapter, EMA
included; and a run of the sharded entrypoint trains, resumes and exports adapters and merged weights."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.config import DistillConfig, DistributedConfig
from entrypoints.distributed import teacher_weights
from entrypoints.run_exports import LORA_EXPORT
from parallel.mesh import ParallelDims
from parallel.parallelize import ParallelConfig
from rcmfn.lora import LoraConfig, merge
from rcmfn.models.registry import get_spec
from tests.parallel.parallel_harness import (
    assert_same_run,
    init_gloo,
    shutdown_gloo,
    spawn_group,
    three_nets,
    train,
)
from tests.parallel.test_distributed import ROOT, _lines, _shards, one_rank_group  # noqa: F401 (fixture)

STEPS = 5  # sCM-only student, student with DMD, critic, student, critic
LORA = LoraConfig(rank=2, alpha=3.0, targets=("attention", "ffn", "modulation"))
CASES = {"fsdp2": ({"dp_shard": 2}, ("wan", "cosmos")), "cp2": ({"dp_shard": 1, "cp": 2}, ("wan",))}
# --lora-full: Wan's biases and the layers outside its blocks; Cosmos-Predict2 has no biases
LORA_FULL = {
    "wan": LoraConfig(2, 3.0, ("attention", "ffn", "modulation"), ("biases", "outside-blocks")),
    "cosmos": LoraConfig(2, 3.0, ("attention", "ffn", "modulation"), ("outside-blocks",)),
}


def _worker(rank, port, out):
    init_gloo(rank, 2, port)
    results = {}
    for case, (dims_kwargs, families) in CASES.items():
        dims = ParallelDims(world_size=2, **dims_kwargs)
        results[case] = {family: train(family, STEPS, dims, lora=LORA) for family in families}
    dims = ParallelDims(world_size=2, dp_shard=2)
    results["fsdp2 full"] = {family: train(family, STEPS, dims, lora=lora) for family, lora in LORA_FULL.items()}
    if rank == 0:
        torch.save(results, out)
    shutdown_gloo()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "world2.pt"
    spawn_group(_worker, 2, lambda port: (port, out))
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_lora_run_equals_single_process(case, sharded):
    for family in CASES[case][1]:
        got, want = sharded[case][family], train(family, STEPS, lora=LORA)
        assert [m["phase"] for m in got["metrics"]] == ["student", "student", "critic", "student", "critic"]
        for name in ("student", "ema", "fake"):  # only adapters train, and they moved from their start
            assert want[name] and all(k.endswith((".lora_down", ".lora_up")) for k in want[name]), name
            assert any(v.abs().max() > 0 for k, v in want[name].items() if k.endswith("lora_up")), name
        assert_same_run(got, want, f"{case} {family}")
        torch.testing.assert_close(got["tangent"], want["tangent"], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("family", sorted(LORA_FULL))
def test_sharded_lora_with_full_tensors_equals_single_process(family, sharded):
    """FSDP 2 with --lora-full: the adapters and the fully trained tensors, stepped at their own rate."""
    got, want = sharded["fsdp2 full"][family], train(family, STEPS, lora=LORA_FULL[family])
    for name in ("student", "ema", "fake"):
        full = [k for k in want[name] if not k.endswith((".lora_down", ".lora_up"))]
        assert full and any(not k.startswith("blocks.") for k in full), name
        assert (family == "wan") == any(k.endswith(".bias") and k.startswith("blocks.") for k in full), name
    teacher = dict(three_nets(family)[1].named_parameters())
    moved = [k for k in full if not torch.equal(want["student"][k], teacher[k].detach())]
    assert moved  # trained, from the teacher's values
    assert_same_run(got, want, f"fsdp2 full {family}")


def test_the_sharded_entrypoint_trains_resumes_and_exports_lora(tmp_path):
    """2 iterations, then resumed to 3: the EMA adapters (student_ema.lora.safetensors, with the layers outside
    the blocks that --lora-full trains) and the release-layout export, which is the teacher's weights merged
    with them in bf16 (student_ema.safetensors)."""
    data = _shards(tmp_path / "data")
    command = [sys.executable, "-m", "entrypoints.distill", "--model", "cosmos-tiny", "--lora-rank", "2"]
    command += ["--lora-alpha", "4", "--lora-targets", "attention", "ffn", "modulation"]
    command += ["--lora-full", "outside-blocks", "--student-lr", "1e-2"]  # at the preset's 1e-5 in warm-up the
    # outer layers' EMA moves below float32's resolution (the adapter file is float32)
    command += ["--distributed.random-init", "--distributed.dtype", "float64", "--distributed.data", str(data)]
    command += ["--output", str(tmp_path / "run"), "--save-every", "2", "--log-every", "1", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1"}
    for iterations in ("2", "3"):
        done = subprocess.run([*command, "--iterations", iterations], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert [line["iteration"] for line in _lines(tmp_path / "run")] == [0, 1, 2]
    adapters = load_file(tmp_path / "run" / LORA_EXPORT)
    low_rank = [k for k in adapters if k.endswith((".weight.lora_down", ".weight.lora_up"))]
    outer = [k for k in adapters if k not in low_rank]  # --lora-full outside-blocks: under their own keys
    assert low_rank and outer and not any(k.startswith("blocks.") for k in outer)
    assert any("adaln_modulation" in k for k in adapters) and any(v.abs().max() > 0 for v in adapters.values())
    cfg = DistillConfig(model="cosmos-tiny", distributed=DistributedConfig(random_init=True))
    teacher = teacher_weights(cfg, get_spec("cosmos-tiny"))
    want = {k: v.to(torch.bfloat16) for k, v in merge(teacher, adapters, alpha=4.0).items()}
    official = get_spec("cosmos-tiny").key_maps["official"]
    exported = {official.to_ours(k): v for k, v in load_file(tmp_path / "run" / "student_ema.safetensors").items()}
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)
    wide = {k: v.double() for k, v in teacher.items()}  # the trained delta is below bf16's resolution here
    changed = sum(not torch.equal(v, wide[k]) for k, v in merge(wide, adapters, alpha=4.0).items())
    assert len(low_rank) // 2 < changed <= len(low_rank) // 2 + len(outer)  # every adapted weight, outer ones too


@pytest.mark.parametrize(
    "model, lora_full",
    [
        ("wan-tiny", ()),
        ("cosmos-tiny", ()),
        ("wan-tiny", ("biases", "outside-blocks")),
        ("cosmos-tiny", ("outside-blocks",)),
    ],
)
def test_lora_student_and_fake_score_start_bit_for_bit_as_the_teacher(one_rank_group, model, lora_full):  # noqa: F811
    """bf16 as the run builds them: frozen weights stored in bf16 beside float32 adapters in one FSDP unit
    (FSDP2 asks a uniform dtype of the trainable parameters only); at iteration 0 (lora_up = 0) both
    networks compute the teacher's output bit for bit, the merged modulation weights included."""
    from entrypoints.sharded_networks import build_networks
    from parallel.sharded_training import init_sharded_state, sharded_networks
    from rcmfn.loop import LoopConfig
    from rcmfn.models.registry import trainable_spec

    cfg = DistillConfig(model=model, distributed=DistributedConfig(random_init=True, dtype="bfloat16"))
    spec, lcfg, cpu = get_spec(model), LoopConfig(), torch.device("cpu")
    full = teacher_weights(cfg, spec)
    trainable = trainable_spec(spec)
    build = lambda lora: build_networks(  # noqa: E731
        trainable, full, one_rank_group, torch.bfloat16, ParallelConfig(), cpu, True, trainable, lora=lora
    )
    teacher = build(None)[0]
    _, student, fake = build(LoraConfig(rank=4, targets=("attention", "ffn", "modulation"), full=lora_full))
    state = init_sharded_state(student, fake, lcfg, lora_full)
    assert {p.dtype for p in state.student.values()} == {torch.float32}  # adapters and full tensors: master
    assert bool(lora_full) == any(not k.endswith((".lora_down", ".lora_up")) for k in state.student.keys())
    frozen = [p for n, p in student.named_parameters() if not p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    nets = sharded_networks(student, teacher, fake, spec.timestep_scale, lcfg, lora_full=lora_full)
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(2, 16, 2, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 3, 24, generator=g).to(torch.bfloat16)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    with torch.no_grad():
        F_teacher = nets.teacher(nets.teacher_params, x_t, t, cond)
        assert torch.equal(nets.student(state.student, x_t, t, cond), F_teacher)
        assert torch.equal(nets.fake(state.fake, x_t, t, cond), F_teacher)
