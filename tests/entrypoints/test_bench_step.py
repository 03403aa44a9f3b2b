"""entrypoints.bench step: its FLOP count is exact and its list of network calls is the loop's own."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from entrypoints.bench.models import CONFIGS, _build, model_flops
from entrypoints.bench.step import iteration_calls, iteration_flops, phase_and_rollout
from entrypoints.toy import build_toy, toy_batch_fn
from rcmfn.loop import LoopConfig, Networks, init_state, train_iteration
from rcmfn.step import LossConfig
from rcmfn.tangent import scm_tangent
from tests.entrypoints.test_distill import TINY_TOY

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["wan-tiny", "cosmos-tiny", "wan-i2v-tiny"])
def test_model_flops_count_every_matmul_of_the_forward(name):
    """On the CPU the attention reference runs as bmm, the rest as mm / addmm: FlopCounterMode counts both."""
    case = CONFIGS[name]
    model, _ = _build(case, torch.device("cpu"), torch.float32, 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *case.latent_shape, generator=g)
    context = case.random_condition(torch.randn(1, case.text_len, case.text_dim, generator=g), g)  # + I2V image
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.rand(1, generator=g) * case.timestep_scale, context)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    linear, attention = model_flops(case, case.tokens())
    assert counts.pop("aten.bmm") == attention
    assert sum(counts.values()) == linear


def _counting(toy, state_of, record):
    """Denoisers that record (network, kind) per call; which network is told by the parameters passed."""

    def denoise(params, x_t, t, cond):
        out = toy.student(params, x_t, t, cond)
        kind = "forward+backward" if torch.is_grad_enabled() and out.requires_grad else "forward"
        record.append((state_of(params), kind))
        return out

    def teacher(params, x_t, t, cond):
        record.append(("teacher", "forward"))
        return toy.teacher(params, x_t, t, cond)

    def tangent(params, x_t, t, cond, F):
        record.append(("student", "jvp"))
        return scm_tangent(toy.student, params, x_t, t, cond, F)

    return denoise, teacher, tangent


@pytest.mark.parametrize("method", ["rcm", "scm", "dmd", "dcm", "dcm+dmd"])
def test_iteration_calls_are_the_calls_the_loop_makes(method):
    toy = build_toy(TINY_TOY, seed=0, progress=False)
    cfg = LoopConfig(LossConfig(method=method, guidance=2.0), student_update_freq=2)
    uses_critic = cfg.loss.uses_critic
    state = init_state(toy.init_params, toy.init_params if uses_critic else None, cfg)
    record: list = []
    denoise, teacher, tangent = _counting(toy, lambda p: "student" if p is state.student else "fake score", record)
    nets = Networks(denoise, teacher, toy.mixture, denoise if uses_critic else None, tangent)
    seen = set()
    for i in range(16):
        record.clear()
        phase, rollout = phase_and_rollout(i, cfg)
        train_iteration(state, nets, toy_batch_fn(toy), cfg)
        want = Counter()
        for call in iteration_calls(phase, rollout, guided=True, method=method):
            want[(call.network, call.kind)] += call.count
        if method == "scm":  # no critic: rollout length is irrelevant to its calls
            want = Counter({k: v for k, v in want.items()})
        assert Counter(record) == want, (i, phase, rollout)
        seen.add((phase, rollout))
    expected = {("student", r) for r in range(1, 5)} | ({("critic", r) for r in range(1, 5)} if uses_critic else set())
    assert seen == expected


def test_iteration_flops_weights_each_kind_of_call():
    calls = iteration_calls("student", 2, guided=True)
    # teacher 4 forwards, student jvp (2L + 3A), 2 forward+backward (3 each), 1 forward; fake 1 forward
    assert iteration_flops(calls, linear=1.0, attention=0.0) == 4 + 2 + 6 + 1 + 1
    assert iteration_flops(calls, linear=0.0, attention=1.0) == 4 + 3 + 6 + 1 + 1
    assert iteration_flops(iteration_calls("critic", 3), 1.0, 1.0) == 3 * 2 + 3 * 2
    # LoRA: a trainable net's backward skips the frozen weights' gradients (linear 2x, attention still 3x)
    assert iteration_flops(calls, linear=1.0, attention=0.0, lora=True) == 4 + 2 + 4 + 1 + 1
    assert iteration_flops(calls, linear=0.0, attention=1.0, lora=True) == 4 + 3 + 6 + 1 + 1


@pytest.mark.parametrize("lora_rank, lora_full", [(0, []), (4, []), (4, ["outside-blocks"])])
def test_bench_step_runs_tiny_on_the_cpu(tmp_path, lora_rank, lora_full):
    out = tmp_path / "step.json"
    command = [
        sys.executable,
        "-m",
        "entrypoints.bench",
        "step",
        "--config",
        "cosmos-tiny",
        "--iterations",
        "9",
        "--json",
        str(out),
        "--lora-rank",
        str(lora_rank),
        *(["--lora-full", *lora_full] if lora_full else []),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("LoRA rank 4" in done.stdout) == (lora_rank == 4)
    assert "| student | 1 |" in done.stdout and "2 x teacher forward" in done.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["lora_rank"] == lora_rank and run["lora_full"] == lora_full
    assert ("in full: outside-blocks" in done.stdout) == bool(lora_full)
    assert {(r["phase"], r["rollout"]) for r in run["rows"]} >= {("student", 1), ("critic", 1)}
    for row in run["rows"]:
        assert row["first_call_s"] > 0 and row["flops"] > 0


def test_bench_step_image_mode_runs_tiny_and_refuses_a_text_only_net(tmp_path):
    """`--image`: the tiny TI2V trainer runs with sample 0 image-conditioned and sample 1 text-only (finite
    rows, recorded in the JSON); a net without a first-frame mode is refused by name, before any iteration."""
    out = tmp_path / "step.json"
    base = [sys.executable, "-m", "entrypoints.bench", "step", "--iterations", "4", "--image", "--batch", "2"]
    done = subprocess.run(
        [*base, "--config", "wan2.2-tiny", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "even samples image-conditioned" in done.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["image"] is True and run["batch"] == 2
    assert {(r["phase"], r["rollout"]) for r in run["rows"]} >= {("student", 1), ("critic", 1)}
    refused = subprocess.run([*base, "--config", "cosmos-tiny"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0
    assert "cosmos-tiny nets have no first-frame image-to-video mode" in refused.stderr
    assert "| student |" not in refused.stdout


def test_build_trainer_conditions_even_samples_on_their_first_frame():
    """The image condition `bench step --image` and the GPU equality test use: sample 0 (even) carries its
    own latent's first frame and uses it, sample 1 does not; the uncondition keeps the image, not the text."""
    import torch.distributed as dist

    from entrypoints.bench.step import build_trainer
    from rcmfn.models.wan.ti2v import FIRST_FRAME, USE_IMAGE
    from tests.parallel.parallel_harness import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        *_, batch_fn, _, _ = build_trainer("wan2.2-tiny", torch.float32, False, batch=2, image=True)
    finally:
        dist.destroy_process_group()
    x0, cond, uncond = batch_fn(None)
    assert cond[USE_IMAGE].tolist() == [True, False] and uncond[USE_IMAGE].tolist() == [True, False]
    assert torch.equal(cond[FIRST_FRAME].float(), x0[:, :, :1].float())
    assert torch.equal(uncond[FIRST_FRAME], cond[FIRST_FRAME])
    assert not torch.equal(uncond["text"], cond["text"])


def test_bench_step_breakdown_splits_the_compiled_first_iteration(tmp_path):
    """`--breakdown` with `--compile`: the first student iteration's wall time splits into the compiler
    (Dynamo, AOT, inductor), the JVP graphs' tracing, the tangent calls and the rest, each part found where
    it belongs -- compiler and JVP-graph time in that first iteration only, the tangent calls in both
    student iterations -- and the parts add up to the total."""
    out = tmp_path / "step.json"
    command = [sys.executable, "-m", "entrypoints.bench", "step", "--config", "cosmos-tiny", "--compile"]
    command += ["--iterations", "4", "--student-update-freq", "2", "--breakdown", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| total | compiler | JVP graphs | tangent calls | rest |" in done.stdout
    rows = {(r["phase"], r["rollout"]): r["breakdown"] for r in json.loads(out.read_text())["runs"][0]["rows"]}
    (first,), (second,) = rows[("student", 1)], rows[("student", 2)]
    assert first["compiler_s"] > 0 and first["jvp_graph_s"] > 0 and first["tangent_call_s"] > 0
    assert second["jvp_graph_s"] == 0 and second["tangent_call_s"] > 0
    for split in (first, second, *rows[("critic", 1)]):
        parts = split["compiler_s"] + split["jvp_graph_s"] + split["tangent_call_s"] + split["rest_s"]
        assert split["rest_s"] > 0 and parts == pytest.approx(split["total_s"])
    assert all(s["tangent_call_s"] == 0 for s in rows[("critic", 1)])  # the critic takes no tangent
