"""Model benchmarks: `python -m entrypoints.bench_models [--config 1.3b|14b|tiny] [--json PATH]`.

Times one network step at the training shape (default: Wan2.1 1.3B, 480p latents 16x21x60x104,
512 text tokens, bf16, batch 1, random weights): plain forward, compiled forward, eager jvp,
compiled jvp (both under no_grad, as rCM's tangent pass) and forward+backward. Reports the median
time of warm runs, the first-call (compile) time, peak CUDA memory and TFLOP/s from the formula
printed beside the table. `--config tiny` runs on CPU as a smoke test. `add_models(subparsers)` adds
the same thing as the `models` subcommand of `entrypoints.bench`.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

import torch

from rcmfn.models.registry import cast_params
from rcmfn.models.wan import WAN_1_3B, WAN_14B, WAN_TINY, WanConfig, WanModel, velocity_net

CONFIGS: dict[str, WanConfig] = {"1.3b": WAN_1_3B, "14b": WAN_14B, "tiny": WAN_TINY}
# (C, T, H, W) latent and text tokens per config: 480p 81 frames for the releases (SPEC-models §3.4).
SHAPES = {"1.3b": ((16, 21, 60, 104), 512), "14b": ((16, 21, 60, 104), 512), "tiny": ((16, 3, 8, 12), 12)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ROWS = ("forward", "compiled forward", "eager jvp", "compiled jvp", "forward+backward")
FLOP_FORMULA = (
    "fwd = N (12 L D^2 + 4 L D F + 4 Lc D^2 + 4 L^2 D + 4 L Lc D) + 2 Lc (Dt D + D^2) + 4 L P D; "
    "jvp = 2 x linear + 3 x attention terms; fwd+bwd = 3 x fwd"
)


def model_flops(cfg: WanConfig, tokens: int, text_len: int) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one forward of one sample; formula in FLOP_FORMULA."""
    D, F, N, L, Lc = cfg.dim, cfg.ffn_dim, cfg.num_layers, tokens, text_len
    patch = cfg.in_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    linear = N * (12 * L * D**2 + 4 * L * D * F + 4 * Lc * D**2) + 2 * Lc * (cfg.text_dim * D + D**2)
    linear += 4 * L * patch * D  # patch embedding and head
    return float(linear), float(N * (4 * L**2 * D + 4 * L * Lc * D))


def _commit() -> str:
    try:
        run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return run.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_row(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """First-call seconds (compile included), median ms of `iters` warm calls, peak memory (CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(first_call_s=first_s, ms=statistics.median(times), peak_gib=peak)


def bench_models(
    config: str = "1.3b",
    batch: int = 1,
    dtype: str = "bf16",
    rows: tuple[str, ...] = ROWS,
    warmup: int = 2,
    iters: int = 5,
    checkpoint_blocks: bool = True,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    """Run the selected rows for one Wan config; returns the JSON-ready result (also the table rows)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; valid: {sorted(CONFIGS)}")
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; valid: {list(ROWS)}")
    cfg, ((channels, frames, height, width), text_len) = CONFIGS[config], SHAPES[config]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    with dev:
        model = cast_params(WanModel(cfg), DTYPES[dtype])
    params = {k: v.detach() for k, v in model.named_parameters()}
    net = velocity_net(model)
    gen = torch.Generator(device=dev).manual_seed(seed)
    act = DTYPES[dtype]
    x = torch.randn(batch, channels, frames, height, width, generator=gen, device=dev).to(act)
    timestep = 1000.0 * torch.rand(batch, generator=gen, device=dev)
    context = torch.randn(batch, text_len, cfg.text_dim, generator=gen, device=dev).to(act)
    tangents = (torch.randn_like(x), torch.randn_like(timestep))

    def forward(p, x, t):
        return net(p, x, t, context)

    def jvp(p, x, t, tx, tt):
        return torch.func.jvp(lambda x, t: net(p, x, t, context), (x, t), (tx, tt))

    with torch.device("meta"):  # same parameters (passed in), blocks checkpointed
        net_ac = velocity_net(WanModel(cfg, block_wrapper=checkpoint_block if checkpoint_blocks else None))

    def fwd_bwd():
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = net_ac(leaves, x, timestep, context).float().square().mean()
        return torch.autograd.grad(loss, list(leaves.values()))

    compiled_forward = torch.compile(forward, fullgraph=True)
    compiled_jvp = torch.compile(jvp, fullgraph=True)
    steps = {
        "forward": lambda: forward(params, x, timestep),
        "compiled forward": lambda: compiled_forward(params, x, timestep),
        "eager jvp": lambda: jvp(params, x, timestep, *tangents),
        "compiled jvp": lambda: compiled_jvp(params, x, timestep, *tangents),
        "forward+backward": fwd_bwd,
    }
    tokens = frames // cfg.patch_size[0] * (height // cfg.patch_size[1]) * (width // cfg.patch_size[2])
    linear, attention = (batch * f for f in model_flops(cfg, tokens, text_len))
    flops = {
        "forward": linear + attention,
        "jvp": 2 * linear + 3 * attention,
        "backward": 3 * (linear + attention),
    }
    results = []
    for name in rows:
        grad_mode = torch.enable_grad() if name == "forward+backward" else torch.no_grad()
        try:
            with grad_mode:
                row = _time_row(steps[name], dev, warmup, iters)
        except torch.cuda.OutOfMemoryError as error:  # recorded in the table, never silently skipped
            row = dict(first_call_s=None, ms=None, peak_gib=None, error=f"OOM: {str(error).splitlines()[0]}")
        kind = "jvp" if "jvp" in name else "backward" if "backward" in name else "forward"
        row.update(what=name, flops=flops[kind], tflops=flops[kind] / row["ms"] * 1e-9 if row["ms"] else None)
        results.append(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return dict(
        benchmark="models",
        model=f"wan{config}",
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=_commit(),
        command=" ".join(["python -m entrypoints.bench_models", *sys.argv[1:]]),
        torch=torch.__version__,
        dtype=dtype,
        latent=[batch, channels, frames, height, width],
        tokens=tokens,
        text_len=text_len,
        activation_checkpointing=checkpoint_blocks,
        flop_formula=FLOP_FORMULA,
        rows=results,
    )


def checkpoint_block(run, block_params, *inputs):
    """Per-block activation checkpointing through WanModel.block_wrapper (non-reentrant)."""
    return torch.utils.checkpoint.checkpoint(run, block_params, *inputs, use_reentrant=False)


def print_table(result: dict) -> None:
    shape = f"{result['latent']} + {result['text_len']} text tokens"
    print(f"{result['model']} {shape}, {result['dtype']}, {result['device']}, commit {result['commit']}")
    print(f"FLOPs: {result['flop_formula']}")
    print("| what | ms | first call s | peak GiB | TFLOP/s |")
    print("|---|---|---|---|---|")
    fmt = lambda value, spec: "-" if value is None else format(value, spec)
    for r in result["rows"]:
        what = r["what"] + (f" ({r['error']})" if "error" in r else "")
        cells = [
            fmt(r["ms"], ".1f"),
            fmt(r["first_call_s"], ".1f"),
            fmt(r["peak_gib"], ".2f"),
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
    )
    print_table(result)
    return result


def add_models(subparsers) -> None:
    """Add `models` (this benchmark) to an argparse subparsers object, e.g. entrypoints.bench's."""
    p = subparsers.add_parser("models", help="Wan DiT forward / jvp / backward, eager and compiled")
    p.add_argument("--config", choices=sorted(CONFIGS), default="1.3b", help="architecture (tiny: CPU smoke)")
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="parameter/activation dtype")
    p.add_argument("--rows", nargs="*", choices=ROWS, default=list(ROWS), help="which rows to run")
    p.add_argument("--warmup", type=int, default=2, help="calls before timing (the first one compiles)")
    p.add_argument("--iters", type=int, default=5, help="timed calls; the median is reported")
    p.add_argument("--no-ac", action="store_true", help="forward+backward without per-block checkpointing")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(run=run_models)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.bench_models", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="benchmark")
    add_models(subparsers)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv if argv[:1] == ["models"] else ["models", *argv])
    result = args.run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
