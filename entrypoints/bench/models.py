"""Model benchmarks: `python -m entrypoints.bench models [--config wan1.3b|cosmos2b|...] [--json PATH]`.

Times one network step at the training shape (default: Wan2.1 1.3B, 480p latents 16x21x60x104,
512 text tokens; cosmos2b: Cosmos-Predict2 2B at 1024 px, latents 16x1x128x128, 512 T5 tokens;
bf16, batch 1, random weights): plain forward, compiled forward, eager jvp, compiled jvp (both
under no_grad, as rCM's tangent pass), forward+backward, and the sharded trainer's tangent pass with
`--compile` (dual numbers through per-block compiled JVP graphs, parallel/block_jvp.py; one GPU,
no sharding). Reports the median time of warm runs, the first-call (compile) time, peak CUDA memory
of the warm runs and of the first call, and TFLOP/s from the formula printed beside the table. The
`*-tiny` configs run on CPU as smoke tests. `add_models(subparsers)` adds the same thing as the
`models` subcommand of `entrypoints.bench`.

size budget: one benchmark, its FLOP count for both model families and its table and CLI.
"""

import argparse
import statistics

import torch

from entrypoints.bench.common import device_busy_ms, provenance, wall_seconds
from parallel.parallelize import apply_ac, apply_compile
from rcmfn.compile import compiled
from rcmfn.models.registry import MODELS, ModelSpec, random_model
from rcmfn.tangent import dual_jvp

# The registry's specs: their default shapes are the training shapes; the tiny ones run on the CPU. A
# two-expert model (wan2.2-*) is timed as one expert: each network call runs one of the two, same architecture.
CONFIGS: dict[str, ModelSpec] = {
    name: MODELS[name]
    for name in (
        *("wan1.3b", "wan14b", "cosmos2b", "cosmos14b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b"),
        *("wan-tiny", "cosmos-tiny", "wan2.2-tiny", "wan2.2-a14b-tiny"),
        *("wan-i2v-14b-480p", "wan-i2v-14b-720p", "wan-i2v-tiny"),
    )
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ROWS = (
    "forward",
    "compiled forward",
    "eager jvp",
    "compiled jvp",
    "forward+backward",
    "block-compiled forward",
    "block-compiled dual jvp",
)
FLOP_FORMULA = (
    "fwd = 2 x (weights applied per token x L + per text token x Lc + once per sample) + N (4 L^2 D + 4 L Lc D); "
    "jvp = 2 x linear + 3 x attention terms; fwd+bwd = 3 x fwd"
)


def model_flops(spec: ModelSpec, tokens: int) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one forward of one sample; formula in FLOP_FORMULA, per family in
    its `forward_flops` (rcmfn/models/*/family.py)."""
    return spec.flops(tokens)


def _build(spec: ModelSpec, dev: torch.device, dtype: torch.dtype, seed: int):
    """(module with random weights on dev, velocity net with the family's time input)."""
    model = random_model(spec, dtype, dev, seed)
    return model, spec.family.velocity(model)


def _block_compiled_model(case, dev, dtype, seed):
    """A separate copy of the network whose blocks are compiled one by one, as `--compile` does in the
    trainers (`parallel.parallelize.apply_compile`)."""
    model, _ = _build(case, dev, dtype, seed)
    return apply_compile(model)


def _block_compiled_forward(case, dev, dtype, seed, x, timestep, context):
    """The trainers' `--compile` student forward on one device."""
    model = _block_compiled_model(case, dev, dtype, seed)
    return lambda: model(x, timestep, context)


def _block_compiled_dual_jvp(case, dev, dtype, seed, x, timestep, context, tangents):
    """The sharded trainer's `--compile` tangent pass on one device; its first call runs the eager dual
    pass, the plain forward that compiles each block's JVP graph, and the first compiled dual pass (all
    in the row's first-call time)."""
    model = _block_compiled_model(case, dev, dtype, seed)
    primed = []

    def dual_pass():
        return dual_jvp(lambda x, t: model(x, t, context), (x, timestep), tangents)

    def step():
        if not primed:
            dual_pass()
            model(x, timestep, context)
            primed.append(True)
        return dual_pass()

    return step


def step_inputs(case: ModelSpec, batch: int, dev: torch.device, dtype: torch.dtype, seed: int):
    """Random (latents, timesteps, condition, (latent tangent, timestep tangent)) at `case`'s shape."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(batch, *case.latent_shape, generator=gen, device=dev).to(dtype)
    timestep = case.timestep_scale * torch.rand(batch, generator=gen, device=dev)
    text = torch.randn(batch, case.text_len, case.text_dim, generator=gen, device=dev).to(dtype)
    context = case.random_condition(text, gen)  # the text, plus e.g. Wan I2V's image condition
    return x, timestep, context, (torch.randn_like(x), torch.randn_like(timestep))


def _time_row(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """First-call seconds (compile included), median ms of `iters` warm calls, and peak CUDA memory of
    the warm calls and of the first call apart: a first call can compile, autotune or (the dual jvp)
    run an eager pass, and its peak says nothing about the steady state."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first_s = wall_seconds(fn, device)
    first_peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = [1e3 * wall_seconds(fn, device) for _ in range(iters)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    # One more call under the profiler: its kernels' device time, against which `ms` shows the host's share.
    device_ms = device_busy_ms(fn) if cuda else None
    return dict(
        first_call_s=first_s,
        ms=statistics.median(times),
        device_ms=device_ms,
        peak_gib=peak,
        first_call_peak_gib=first_peak,
    )


def bench_models(
    config: str = "wan1.3b",
    batch: int = 1,
    dtype: str = "bf16",
    rows: tuple[str, ...] = ROWS,
    warmup: int = 2,
    iters: int = 5,
    checkpoint_blocks: bool = True,
    device: str | None = None,
    seed: int = 0,
    on_row=None,
) -> dict:
    """Run the selected rows for one config; returns the JSON-ready result (also the table rows).

    `on_row(row)` is called as each row finishes (progress: a compiled row can take minutes).
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; valid: {sorted(CONFIGS)}")
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; valid: {list(ROWS)}")
    case = CONFIGS[config]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    act = DTYPES[dtype]
    model, net = _build(case, dev, act, seed)
    params = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    x, timestep, context, tangents = step_inputs(case, batch, dev, act, seed)

    def forward(p, x, t):
        return net(p, x, t, context)

    def jvp(p, x, t, tx, tt):
        return torch.func.jvp(lambda x, t: net(p, x, t, context), (x, t), (tx, tt))

    # Per-block checkpointing as training applies it (parallel.parallelize.apply_ac): a pass-through
    # without grad, so the other rows are unaffected. forward+backward calls the module itself, whose
    # recomputation reads the module's own parameters (functional_call's are restored by then).
    apply_ac(model, "full" if checkpoint_blocks else "none")

    def fwd_bwd():
        loss = model(x, timestep, context).float().square().mean()
        return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    compiled_forward = compiled(forward)
    compiled_jvp = compiled(jvp)
    # Each row's step is made just before the row runs and dropped after it, so that the block-compiled
    # rows' own copy of the network counts in their peak memory and in no other row's.
    make_step = {
        "block-compiled forward": lambda: _block_compiled_forward(case, dev, act, seed, x, timestep, context),
        "block-compiled dual jvp": lambda: _block_compiled_dual_jvp(
            case, dev, act, seed, x, timestep, context, tangents
        ),
        "forward": lambda: lambda: forward(params, x, timestep),
        "compiled forward": lambda: lambda: compiled_forward(params, x, timestep),
        "eager jvp": lambda: lambda: jvp(params, x, timestep, *tangents),
        "compiled jvp": lambda: lambda: compiled_jvp(params, x, timestep, *tangents),
        "forward+backward": lambda: fwd_bwd,
    }
    tokens = case.tokens()
    linear, attention = (batch * f for f in model_flops(case, tokens))
    flops = {
        "forward": linear + attention,
        "jvp": 2 * linear + 3 * attention,
        "backward": 3 * (linear + attention),
    }
    results = []
    for name in rows:
        grad_mode = torch.enable_grad() if name == "forward+backward" else torch.no_grad()
        step = make_step[name]()
        try:
            with grad_mode:
                row = _time_row(step, dev, warmup, iters)
        except torch.cuda.OutOfMemoryError as error:  # recorded in the table, never silently skipped
            row = dict(
                first_call_s=None,
                ms=None,
                peak_gib=None,
                first_call_peak_gib=None,
                error=f"OOM: {str(error).splitlines()[0]}",
            )
        del step
        kind = "jvp" if "jvp" in name else "backward" if "backward" in name else "forward"
        row.update(what=name, flops=flops[kind], tflops=flops[kind] / row["ms"] * 1e-9 if row["ms"] else None)
        results.append(row)
        if on_row is not None:
            on_row(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return dict(
        **provenance("models", dev),
        model=config,
        dtype=dtype,
        latent=[batch, *case.latent_shape],
        tokens=tokens,
        text_len=case.text_len,
        linear_flops=linear,
        attention_flops=attention,
        activation_checkpointing=checkpoint_blocks,
        flop_formula=FLOP_FORMULA,
        rows=results,
    )


def print_table(result: dict) -> None:
    shape = f"{result['latent']} + {result['text_len']} text tokens"
    print(f"{result['model']} {shape}, {result['dtype']}, {result['device']}, commit {result['commit']}")
    print(f"FLOPs: {result['flop_formula']}")
    print("| what | ms | device ms | first call s | peak GiB | first-call peak GiB | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda value, spec: "-" if value is None else format(value, spec)
    for r in result["rows"]:
        what = r["what"] + (f" ({r['error']})" if "error" in r else "")
        cells = [
            fmt(r["ms"], ".1f"),
            fmt(r.get("device_ms"), ".1f"),
            fmt(r["first_call_s"], ".1f"),
            fmt(r["peak_gib"], ".2f"),
            fmt(r.get("first_call_peak_gib"), ".2f"),
            fmt(r["tflops"], ".3g"),
        ]
        print(f"| {what} | {' | '.join(cells)} |")


def run_models(args: argparse.Namespace) -> dict:
    result = bench_models(
        config=args.config,
        batch=args.batch,
        dtype=args.dtype,
        rows=tuple(args.rows),
        warmup=args.warmup,
        iters=args.iters,
        checkpoint_blocks=not args.no_ac,
        device=args.device,
        on_row=lambda row: print(
            f"done: {row['what']}: {row['ms']} ms, first call {row['first_call_s']} s", flush=True
        ),
    )
    if args.commit:
        result["commit"] = args.commit
    print_table(result)
    if args.compile_times:  # where a slow first call spends its time (Dynamo, AOT, inductor phases)
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True))
    return result


def add_models(subparsers) -> None:
    """Add `models` (this benchmark) to an argparse subparsers object, e.g. entrypoints.bench's."""
    p = subparsers.add_parser("models", help="Wan / Cosmos DiT forward, jvp, backward, eager and compiled")
    p.add_argument("--config", choices=sorted(CONFIGS), default="wan1.3b", help="network and shape (*-tiny: CPU smoke)")
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="parameter/activation dtype")
    p.add_argument("--rows", nargs="*", choices=ROWS, default=list(ROWS), help="which rows to run")
    p.add_argument("--warmup", type=int, default=2, help="calls before timing (the first one compiles)")
    p.add_argument("--iters", type=int, default=5, help="timed calls; the median is reported")
    p.add_argument("--no-ac", action="store_true", help="forward+backward without per-block checkpointing")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--compile-times", action="store_true", help="print the compiler's time per phase at the end")
    p.set_defaults(run=run_models)
