"""Whole-iteration benchmark: `python -m entrypoints.bench step --config cosmos2b|wan1.3b [--compile]`.

Times the sharded trainer's own iteration (`rcmfn.loop.train_iteration` over FSDP networks of world
size 1, float32 master weights, bf16 compute, random weights, learning rate 0 so that every iteration
sees the same weights) at the model's training shape, split by phase (student / critic) and rollout
length: wall time as a user sees it (host included, synchronised), the first call of each kind apart
(compilation, kernel tuning), peak memory, tokens/s, and MFU from a FLOP count that lists every network
call of the iteration (`iteration_calls`, checked against the loop by tests/entrypoints/test_bench_step.py).
`--profile DIR` writes a Chrome trace of one steady iteration per kind and reports the GPU's busy time.

size budget: one benchmark with its call-by-call FLOP accounting, the trainer it builds (shared with the
GPU tests), its table and its CLI.
"""

import argparse
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from entrypoints.bench.common import device_busy_ms, provenance, wall_seconds
from entrypoints.bench.first_call import BREAKDOWN_HEADER, FirstCallClock, breakdown_line
from entrypoints.bench.models import FLOP_FORMULA, model_flops
from rcmfn.condition import with_text
from rcmfn.models.registry import get_spec, random_model
from rcmfn.schedule import critic_iteration, effective_student_iteration, is_student_phase, rollout_steps

# Multiples of one forward's (linear, attention) FLOPs per kind of call (bench_models.FLOP_FORMULA):
# backward = 2 x forward; the jvp's tangent re-applies every weight (2 x linear) and the fused attention
# tangent costs two more products per score tile (3 x attention). Recomputation (activation
# checkpointing) is not counted: MFU counts the model's FLOPs, not the hardware's.
CALL_COST = {"forward": (1, 1), "forward+backward": (3, 3), "jvp": (2, 3)}
# A LoRA net's backward skips the frozen weights' gradients: its linear layers cost 2 x forward there (the
# input gradient), the adapters' own products are below 1 % at the ranks used and are not counted.
LORA_CALL_COST = CALL_COST | {"forward+backward": (2, 3)}
H200_BF16_PEAK_TFLOPS = 790.0  # measured 8192^3 bf16 matmul rate on the H200 (docs/benchmarks.md)


@dataclass(frozen=True)
class NetworkCall:
    """`count` calls of one network of one kind (no grad forward, forward with its backward, jvp)."""

    network: str
    kind: str
    count: int
    why: str


def iteration_calls(
    phase: str, rollout: int, guided: bool = True, method: str = "rcm", dcm_skip_steps: int = 1
) -> list[NetworkCall]:
    """Every network call of one iteration of `method` (SPEC-rcm Algorithm; rcmfn/step.py), per sample.

    `rollout`: the backward simulation's steps (rcmfn.schedule.rollout_steps); `guided`: the teacher is
    called twice (conditional and unconditional) for CFG; `dcm_skip_steps`: the teacher Euler steps
    between a dCM prediction and its target (LossConfig.dcm_skip_steps, SPEC-rcm §5).
    """
    teacher = 2 if guided else 1
    if phase == "critic":
        return [
            NetworkCall("student", "forward", rollout, "gradient-free rollout"),
            NetworkCall("fake score", "forward+backward", 1, "flow matching at t_D"),
        ]
    calls = []
    if method in ("dcm", "dcm+dmd"):
        calls += [
            NetworkCall("student", "forward+backward", 1, "dCM prediction at t_0"),
            NetworkCall("teacher", "forward", teacher * dcm_skip_steps, "dCM teacher Euler steps (CFG)"),
            NetworkCall("student", "forward", 1, "dCM target at t_K"),
        ]
    if method in ("rcm", "scm"):
        calls += [
            NetworkCall("teacher", "forward", teacher, "sCM target (CFG)"),
            NetworkCall("student", "jvp", 1, "sCM tangent"),
            NetworkCall("student", "forward+backward", 1, "sCM loss"),
        ]
    if method in ("rcm", "dmd", "dcm+dmd"):
        calls += [
            NetworkCall("student", "forward", rollout - 1, "rollout before the last step"),
            NetworkCall("student", "forward+backward", 1, "rollout's last step (DMD gradient)"),
            NetworkCall("fake score", "forward", 1, "fake x0 at t_D"),
            NetworkCall("teacher", "forward", teacher, "real x0 at t_D (CFG)"),
        ]
    return [c for c in calls if c.count > 0]


def iteration_flops(calls: list[NetworkCall], linear: float, attention: float, lora: bool = False) -> float:
    """FLOPs of `calls`, given one forward's linear and attention FLOPs (for the whole batch); `lora`: the
    trainable nets are LoRA adapters on frozen weights (no weight gradients for the frozen linears)."""
    cost = LORA_CALL_COST if lora else CALL_COST
    return sum(c.count * (cost[c.kind][0] * linear + cost[c.kind][1] * attention) for c in calls)


def phase_and_rollout(i: int, lcfg) -> tuple[str, int]:
    """What iteration i of the loop does: ("student" | "critic", rollout steps), as rcmfn.loop decides."""
    schedule, steps = lcfg.schedule, lcfg.loss.max_rollout_steps
    if is_student_phase(i, schedule):
        return "student", rollout_steps(effective_student_iteration(i, schedule), steps)
    return "critic", rollout_steps(critic_iteration(i, schedule), steps)


def build_trainer(
    model: str,
    dtype: torch.dtype,
    compile_: bool,
    blocks: int | None = None,
    batch: int = 1,
    ac: str = "none",
    max_bad_steps: int = 3,
    student_update_freq: int = 2,
    lora_rank: int = 0,
    image: bool = False,
    lora_full: tuple[str, ...] = (),
):
    """The sharded trainer of entrypoints.distributed at `model`'s training shape, learning rates 0;
    `lora_rank` > 0: student and fake score as LoRA adapters on the frozen teacher (the preset's targets),
    `lora_full`: distill's --lora-full beside them;
    `image`: every even sample is conditioned on its latent's first frame (Family.latent_condition, Wan2.2
    TI2V's image-to-video mode), the odd ones on text only.

    Returns (state, networks, loop config, batch_fn, student module, ModelSpec of the net and shape). Needs an
    initialised default process group (world size 1 is enough). `blocks` cuts the network (GPU tests).
    """
    from entrypoints.config import DistillConfig, DistributedConfig, loop_config, lora_config
    from entrypoints.distributed import build_networks
    from parallel.mesh import ParallelDims
    from parallel.parallelize import ParallelConfig
    from parallel.sharded_training import init_sharded_state, sharded_networks

    if image and get_spec(model).family.latent_condition is None:  # before minutes of building
        raise ValueError(f"{model} nets have no first-frame image-to-video mode")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DistillConfig(
        model=model,
        student_lr=0.0,
        fake_lr=0.0,
        tangent_warmup=0,
        student_update_freq=student_update_freq,
        max_bad_steps=max_bad_steps,
        lora_rank=lora_rank,
        lora_full=lora_full,
        distributed=DistributedConfig(random_init=True, batch_size=batch, ac=ac),
    )
    spec = get_spec(model) if blocks is None else get_spec(model).with_blocks(blocks)
    # random weights drawn on the device: drawing a 14B's on the host takes minutes (bench only; the
    # trainer draws rank 0's on the host as a checkpoint would be read)
    full = random_model(spec, torch.bfloat16, device, cfg.seed).state_dict()
    meshes = ParallelDims(1).build_meshes(device.type)
    lcfg = loop_config(cfg)
    # As the runner builds them: float32 master weights all-gathered in `dtype`, the float32 time path
    lora = lora_config(cfg)
    teacher, student, fake = build_networks(
        spec, full, meshes, dtype, ParallelConfig(ac=ac, compile=compile_), device, True, lora=lora, lora_seed=cfg.seed
    )
    del full  # rank 0's host copy: the networks hold their own
    nets = sharded_networks(student, teacher, fake, spec.timestep_scale, lcfg, lora_full=lora.full)
    state = init_sharded_state(student, fake, lcfg, lora.full)
    latent, text_len = spec.latent_shape, spec.text_len
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(batch, *latent, generator=g).to(device)
    text = (batch, text_len, spec.text_dim)
    cond, uncond = (torch.randn(text, generator=g).to(device, torch.bfloat16) for _ in range(2))
    if image:
        even = torch.arange(batch, device=device) % 2 == 0
        cond = spec.family.latent_condition(cond, x0[:, :, :1], even)
        uncond = with_text(cond, uncond)
    return state, nets, lcfg, (lambda gen: (x0, cond, uncond)), student, spec


def bench_step(
    model: str,
    compile_: bool,
    iterations: int = 24,
    batch: int = 1,
    blocks: int | None = None,
    ac: str = "none",
    peak_tflops: float = H200_BF16_PEAK_TFLOPS,
    profile_dir: str | None = None,
    student_update_freq: int = 2,
    lora_rank: int = 0,
    image: bool = False,
    breakdown: bool = False,
    lora_full: tuple[str, ...] = (),
) -> dict:
    """Time `iterations` iterations of the trainer; rows per (phase, rollout) kind. `breakdown`: also split
    each iteration into compiler, JVP graphs, tangent calls and the rest (entrypoints/bench/first_call.py)."""
    from rcmfn.loop import train_iteration

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    state, nets, lcfg, batch_fn, _, case = build_trainer(
        model,
        dtype,
        compile_,
        blocks,
        batch,
        ac,
        student_update_freq=student_update_freq,
        lora_rank=lora_rank,
        image=image,
        lora_full=lora_full,
    )
    # what the run keeps between iterations: weights, optimizer state, EMA (the optimizer's lazily
    # created state appears after the first step of each net: read again at the end)
    resident_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    tokens = case.tokens()
    linear, attention = (batch * f for f in model_flops(case, tokens))
    guided = lcfg.loss.guidance != 1.0
    seconds: dict[tuple, list[float]] = defaultdict(list)
    splits: dict[tuple, list[dict]] = defaultdict(list)
    peak: dict[tuple, float] = {}
    busy: dict[tuple, float] = {}
    clock = FirstCallClock(device)
    for i in range(iterations):
        kind = phase_and_rollout(i, lcfg)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        iteration = lambda: train_iteration(state, nets, batch_fn, lcfg)  # noqa: E731
        if breakdown:
            with clock.installed():
                splits[kind].append(clock.measure(iteration))
            seconds[kind].append(splits[kind][-1]["total_s"])
        else:
            seconds[kind].append(wall_seconds(iteration, device))
        if device.type == "cuda":
            peak[kind] = max(peak.get(kind, 0.0), torch.cuda.max_memory_allocated() / 2**30)
        if profile_dir and device.type == "cuda" and len(seconds[kind]) == 2 and kind not in busy:
            trace = f"{profile_dir}/{model}-{'compiled' if compile_ else 'eager'}-{kind[0]}{kind[1]}.json"
            snapshot = state.iteration
            state.iteration = i  # the same kind again, profiled (learning rate 0: nothing changes)
            busy[kind] = device_busy_ms(lambda: train_iteration(state, nets, batch_fn, lcfg), trace)
            state.iteration = snapshot
    rows = []
    for (phase, rollout), times in sorted(seconds.items()):
        calls = iteration_calls(phase, rollout, guided, lcfg.loss.method, lcfg.loss.dcm_skip_steps)
        flops = iteration_flops(calls, linear, attention, lora=lora_rank > 0)
        steady = statistics.median(times[1:]) if len(times) > 1 else None
        row = dict(
            phase=phase,
            rollout=rollout,
            count=len(times),
            first_call_s=times[0],
            s=steady,
            tokens_per_s=batch * tokens / steady if steady else None,
            tflops=flops / steady * 1e-12 if steady else None,
            peak_gib=peak.get((phase, rollout)),
            flops=flops,
            calls=[asdict(c) for c in calls],
        )
        row["mfu"] = row["tflops"] / peak_tflops if row["tflops"] and device.type == "cuda" else None
        if (phase, rollout) in busy:
            row["device_busy_s"] = busy[(phase, rollout)] / 1e3
        if splits[(phase, rollout)]:
            row["breakdown"] = splits[(phase, rollout)]  # per iteration, in order
        rows.append(row)
    return dict(
        **provenance("step", device),
        model=model + (f" x{blocks} blocks" if blocks else ""),
        compile=compile_,
        batch=batch,
        lora_rank=lora_rank,
        lora_full=list(lora_full),
        image=image,
        built_gib=resident_gib,
        resident_gib=torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None,
        latent=list(case.latent_shape),
        tokens=tokens,
        activation_checkpointing=ac,
        linear_flops=linear,
        attention_flops=attention,
        flop_formula=FLOP_FORMULA,
        peak_tflops=peak_tflops,
        rows=rows,
    )


def print_step_table(result: dict) -> None:
    mode = "--compile" if result["compile"] else "eager"
    lora = f", LoRA rank {result['lora_rank']}" if result["lora_rank"] else ""
    lora += f", in full: {' '.join(result['lora_full'])}" if result.get("lora_full") else ""
    lora += ", even samples image-conditioned" if result.get("image") else ""
    print(f"{result['model']}, batch {result['batch']} x {result['tokens']} tokens, {mode}{lora}, {result['device']}")
    if result["resident_gib"] is not None:
        print(
            f"resident between iterations: {result['resident_gib']:.1f} GiB (after building: {result['built_gib']:.1f})"
        )
    print("| phase | rollout | iterations | first call s | s | tokens/s | TFLOP/s | MFU | peak GiB | GPU busy s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in result["rows"]:
        cells = [r["phase"], r["rollout"], r["count"], fmt(r["first_call_s"], ".2f"), fmt(r["s"], ".3f")]
        cells += [fmt(r["tokens_per_s"], ".0f"), fmt(r["tflops"], ".1f"), fmt(r["mfu"], ".1%")]
        cells += [fmt(r["peak_gib"], ".1f"), fmt(r.get("device_busy_s"), ".3f")]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    backward = "2x linear (frozen weights: no weight gradients) + 3x attention" if result["lora_rank"] else "3x"
    print(f"Network calls per iteration (forward 1x, forward+backward {backward}, jvp 2x linear + 3x attention FLOPs):")
    if any("breakdown" in r for r in result["rows"]):
        print(BREAKDOWN_HEADER)
        for r in result["rows"]:
            first, *rest = r["breakdown"]
            print(breakdown_line((r["phase"], r["rollout"]), first, rest[-1] if rest else None))
    for r in result["rows"]:
        listed = "; ".join(f"{c['count']} x {c['network']} {c['kind']} ({c['why']})" for c in r["calls"])
        print(f"  {r['phase']} rollout {r['rollout']}: {r['flops']:.3e} FLOPs = {listed}")


def run_step(args: argparse.Namespace) -> dict:
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29541")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    results = []
    for compile_ in (False, True) if args.both else (args.compile,):
        result = bench_step(
            args.config,
            compile_,
            args.iterations,
            args.batch,
            args.blocks,
            args.ac,
            args.peak_tflops,
            args.profile,
            args.student_update_freq,
            args.lora_rank,
            args.image,
            args.breakdown,
            tuple(args.lora_full),
        )
        print_step_table(result)
        results.append(result)
    if args.compile_times:  # where a slow first iteration spends its time (Dynamo, AOT, inductor phases)
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True))
    return {"benchmark": "step", "runs": results}


def add_step(subparsers) -> None:
    """Add `step` (this benchmark) to entrypoints.bench's subcommands."""
    p = subparsers.add_parser("step", help="a whole rCM training iteration (student and critic), eager and compiled")
    p.add_argument(
        "--config", default="cosmos2b", help="model preset (cosmos2b, wan1.3b, ...; cosmos-tiny, wan-tiny on the CPU)"
    )
    p.add_argument("--compile", action="store_true", help="the trainer's --compile (per-block compile)")
    p.add_argument("--both", action="store_true", help="eager, then --compile, in one process")
    p.add_argument("--iterations", type=int, default=24, help="iterations (24: each phase x rollout kind 3 times)")
    p.add_argument("--batch", type=int, default=1, help="samples per iteration")
    p.add_argument("--blocks", type=int, default=None, help="cut the network to this many blocks")
    p.add_argument("--ac", default="none", choices=("none", "full", "mm_only"), help="activation checkpointing")
    p.add_argument("--student-update-freq", type=int, default=2, help="one student iteration every F")
    p.add_argument(
        "--lora-rank", type=int, default=0, help="student and fake score as rank-R LoRA adapters (distill's)"
    )
    p.add_argument("--lora-full", nargs="*", default=[], help="distill's --lora-full (biases, outside-blocks)")
    p.add_argument(
        "--image", action="store_true", help="condition even samples on their first frame (Wan2.2 TI2V image mode)"
    )
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS, help="MFU denominator")
    p.add_argument("--profile", default=None, help="folder for Chrome traces of one iteration per kind (GPU)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--compile-times", action="store_true", help="print the compiler's time per phase at the end")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="split each iteration: compiler, JVP graphs, tangent calls, the rest (device synced per tangent call)",
    )
    p.set_defaults(run=run_step)
