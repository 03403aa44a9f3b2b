"""On CUDA, at real width: the `--compile` training iteration equals the eager one, and divergence stops it.

The real trainer's networks (FSDP of world size 1, float32 master weights, bf16 compute, random init),
cut to `BLOCKS` blocks of cosmos2b and wan1.3b at their training shapes (4,096 and 31,200 tokens, 512
text tokens), one block of wan2.2-ti2v-5b at 27,280 tokens in its image-to-video mode (batch 2: one
sample conditioned on its first frame, one on text only; its float32 reference alone takes minutes), and
wan1.3b as rank-64 LoRA adapters with `--lora-full biases outside-blocks` (the gradient norm is then that of
the adapters and the fully trained tensors).
Learning rates are 0, so every variant sees the same weights at every iteration: iterations 0 and 1
compile the blocks and their JVP graphs, 2 (student: sCM with the compiled tangent, DMD) and 3 (critic)
are compared. Tolerance, from a float32 eager run of the same: the compiled bf16 value may be no further
from float32 than twice the eager bf16 value's distance, plus 1 %. Before inductor's mix-order reduction
was switched off (rcmfn/compile.py) the compiled gradient norms here were inf.
"""

import math
import os
import time

import pytest
import torch

BLOCKS = 2
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
COMPARED = ("scm_loss", "tangent_norm", "dmd_loss", "grad_norm", "fake_score_loss")


@pytest.fixture(autouse=True)
def one_kernel_config(monkeypatch):
    """The portable attention kernel (the float32 reference run's) tries only the configuration that fits
    every dtype: its full search space tunes for about 35 s per new shape in float32 on the H200."""
    if not torch.cuda.is_available():
        return
    from ops.attention import kernel

    tuned = kernel._attention_fwd_jvp_tuned
    keep = [
        c
        for c in tuned.configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == kernel.FALLBACK_CONFIG
    ]
    monkeypatch.setattr(tuned, "configs", keep)


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    from tests.parallel.parallel_harness import free_port

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# case -> (model, its tiny registry entry for the CPU smoke run, blocks, batch, image mode: sample 0
# conditioned on its first frame, sample 1 on text only; LoRA rank, --lora-full scopes)
CASES = {
    "cosmos2b": ("cosmos2b", "cosmos-tiny", BLOCKS, 1, False, 0, ()),
    "wan1.3b": ("wan1.3b", "wan-tiny", BLOCKS, 1, False, 0, ()),
    "wan2.2-ti2v-5b": ("wan2.2-ti2v-5b", "wan2.2-tiny", 1, 2, True, 0, ()),
    "wan1.3b-lora64-full": ("wan1.3b", "wan-tiny", BLOCKS, 1, False, 64, ("biases", "outside-blocks")),
}


def trainer(case: str, dtype: torch.dtype, compile_: bool, tiny: bool = False, max_bad_steps: int = 3):
    """(state, networks, loop config, batch_fn, student module) of the sharded trainer, cut as CASES says."""
    from entrypoints.bench.step import build_trainer

    model, tiny_name, blocks, batch, image, rank, full = CASES[case]
    built = build_trainer(
        tiny_name if tiny else model,
        dtype,
        compile_,
        blocks=blocks,
        batch=batch,
        max_bad_steps=max_bad_steps,
        image=image,
        lora_rank=min(rank, 8) if tiny else rank,  # the tiny nets are 32 wide
        lora_full=full,
    )
    return built[:5]


def iterate(case: str, dtype: torch.dtype, compile_: bool, tiny: bool = False) -> list[dict]:
    from rcmfn.loop import train_iteration

    start = time.perf_counter()
    state, nets, lcfg, batch_fn, _ = trainer(case, dtype, compile_, tiny)
    rows = [train_iteration(state, nets, batch_fn, lcfg) for _ in range(4)]
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    shown = [{k: f"{r[k]:.6g}" for k in COMPARED if k in r} for r in rows[2:]]
    seconds = time.perf_counter() - start
    # flushed: seen even if a later variant times out
    print(f"\n{case} {dtype} compile={compile_} ({seconds:.0f} s): {shown}", flush=True)
    return rows


def close_enough(compiled: float, eager: float, reference: float) -> bool:
    return abs(compiled - reference) <= 2 * abs(eager - reference) + 0.01 * abs(reference)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_iteration_equals_eager_at_real_width(process_group, case):
    reference = iterate(case, torch.float32, compile_=False)
    eager = iterate(case, torch.bfloat16, compile_=False)
    compiled = iterate(case, torch.bfloat16, compile_=True)
    print(f"\n{case}, iterations 2 (student) and 3 (critic): float32 | bf16 eager | bf16 compiled")
    failures = []
    for i in (2, 3):
        for key in COMPARED:
            if key not in reference[i]:
                continue
            r, e, c = reference[i][key], eager[i][key], compiled[i][key]
            print(f"  {i} {key}: {r:.6g} | {e:.6g} | {c:.6g}")
            if not (math.isfinite(c) and close_enough(c, e, r)):
                failures.append((i, key, r, e, c))
    assert all(not row["step_skipped"] for row in compiled)
    assert not failures, failures


def divergence_check(tiny: bool = False) -> None:
    """A student whose last block turns non-finite (as a diverged one does): every sample of its sCM loss is
    masked, its gradient is NaN (0 x NaN through the masked activations), the step is skipped with the
    weights, EMA and optimiser state unchanged, and the second bad step in a row raises DivergenceError.
    (FSDP2 assigns the sharded gradients itself, so a tensor hook on a parameter never sees them.)"""
    from rcmfn.divergence import DivergenceError
    from rcmfn.loop import train_iteration

    state, nets, lcfg, batch_fn, student = trainer("cosmos2b", torch.bfloat16, True, tiny=tiny, max_bad_steps=2)
    for _ in range(2):
        assert not train_iteration(state, nets, batch_fn, lcfg)["step_skipped"]
    full = lambda t: t.full_tensor().clone()  # noqa: E731
    before = {k: full(v) for k, v in state.student.items()}
    ema = {k: full(v) for k, v in state.ema.items()}
    hook = student.blocks[-1].register_forward_hook(lambda module, args, out: out * float("inf"))
    row = train_iteration(state, nets, batch_fn, lcfg)
    assert row["phase"] == "student" and row["step_skipped"] and row["grad_nonfinite"] > 0, row
    assert row["scm_masked"] == 1 and state.student_steps == 1
    assert all(torch.equal(full(v), before[k]) for k, v in state.student.items())
    assert all(torch.equal(full(v), ema[k]) for k, v in state.ema.items())
    hook.remove()
    train_iteration(state, nets, batch_fn, lcfg)  # critic, unaffected
    hook = student.blocks[-1].register_forward_hook(lambda module, args, out: out * float("inf"))
    with pytest.raises(DivergenceError, match="student diverged: 2 consecutive bad steps"):
        train_iteration(state, nets, batch_fn, lcfg)
    hook.remove()


@gpu
@pytest.mark.gpu
def test_compiled_iteration_skips_a_non_finite_step_and_stops_at_real_width(process_group):
    divergence_check()


if __name__ == "__main__" and os.environ.get("RCMFN_CPU_SMOKE"):  # the harness itself, tiny, on the CPU
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
    for m in CASES:
        rows = iterate(m, torch.float32, False, tiny=True)
        print(m, [{k: round(r[k], 4) for k in COMPARED if k in r} for r in rows[2:]])
    divergence_check(tiny=True)
    print("divergence check passed")
