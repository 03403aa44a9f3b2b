"""The fused attention kernels inside a network's tangent pass (GPU): time and kernel profile of each.

`python -m scripts.attention_in_model [--config cosmos2b] [--iters 5] [--kernels K ...] [--trace-dir D]`
runs the trainers' `--compile` tangent pass (block-compiled dual jvp under no_grad, as
`entrypoints.bench_models` times it) once per entry of `--kernels`, in one process: `hopper` (the
Hopper kernel at every supported length: both `hopper` thresholds 0), `default` (`hopper.min_keys`) or
`portable` (the portable kernel only). Repeating entries shows the run-to-run spread. For each it
prints the median wall time, then a `torch.profiler` summary of one pass: total device time, the
attention kernels' device time and call count, and the largest other kernels; `--trace-dir` keeps
each profiled pass as a gzipped Chrome trace and `--json` all of it as JSON. Wall time well above
device time means the GPU waited (host-bound or synchronised); the attention rows say whether a kernel
is slower in context than alone.
Written to find why Cosmos 2B's pass once timed slower with the Hopper kernel (docs/benchmarks.md,
Attention); `*-tiny` configs run it on a CPU as a smoke test (no Triton kernels there).
"""

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from entrypoints import bench_models
from ops.attention import hopper

KERNEL_NAMES = ("_fwd_jvp_hopper_kernel", "_attention_fwd_jvp_kernel")
# (hopper.MIN_KEYS, hopper.MIN_KEYS_NO_KV_TANGENT) for each pass, and its label
MIN_KEYS = {
    "hopper": ((0, 0), "Hopper kernel at every length"),
    "default": ((hopper.MIN_KEYS, hopper.MIN_KEYS_NO_KV_TANGENT), "Hopper kernel from hopper.min_keys (default)"),
    "portable": ((1 << 62, 1 << 62), "portable kernel only"),
}


def tangent_pass(config: str, seed: int = 0):
    """The block-compiled dual jvp step of `config` at its benchmark shape, on the default device."""
    case = bench_models.CONFIGS[config]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x, timestep, context, tangents = bench_models.step_inputs(case, 1, dev, dtype, seed)
    return dev, bench_models._block_compiled_dual_jvp(case, dev, dtype, seed, x, timestep, context, tangents)


def measure(step, dev, iters: int, trace: str | None = None) -> dict:
    """`bench_models`' timing of the pass (first call compiles) and one profiled pass (its Chrome
    trace written to `trace` if given), without autograd history as `bench_models` times it (with
    history the block-compiled pass runs its blocks eagerly). Kernel rows: (kernel, calls, device ms)."""
    with torch.no_grad():
        timing = bench_models._time_row(step, dev, warmup=1, iters=iters)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        step()
        bench_models._sync(dev)
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
    rows = [dict(kernel=e.key, calls=e.count, device_ms=e.self_device_time_total / 1e3) for e in kernels]
    attention = [r for r in rows if any(name in r["kernel"] for name in KERNEL_NAMES)]
    others = [r for r in rows if r not in attention][:8]
    # The fused op's host time per call (the profiler's own cost included): the pass is host-bound
    # where it exceeds the kernels' device time.
    op = [e for e in events if e.key == "rcmfn::attention_fwd_jvp" and e.device_type.name == "CPU"]
    op_host_us = op[0].cpu_time_total / op[0].count if op else None
    device_ms = sum(r["device_ms"] for r in rows)
    return dict(**timing, device_ms=device_ms, op_host_us=op_host_us, attention=attention, others=others)


def report(label: str, result: dict) -> None:
    print(f"\n{label}: first call {result['first_call_s']:.1f} s, pass {result['ms']:.1f} ms (median), ", end="")
    print(f"device time {result['device_ms']:.1f} ms in one profiled pass", end="")
    if result["op_host_us"] is not None:
        print(f", host time {result['op_host_us']:.0f} us per rcmfn::attention_fwd_jvp call", end="")
    print()
    print("| kernel | calls | device ms | us per call |")
    print("|---|---|---|---|")
    for r in [*result["attention"], *result["others"]]:
        per_call_us = 1e3 * r["device_ms"] / max(r["calls"], 1)
        print(f"| {r['kernel'][:70]} | {r['calls']} | {r['device_ms']:.2f} | {per_call_us:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(bench_models.CONFIGS), default="cosmos2b")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--trace-dir", help="write each profiled pass's Chrome trace here")
    parser.add_argument("--json", help="write every pass's timing and profile rows to this file")
    parser.add_argument(
        "--kernels", nargs="+", choices=sorted(MIN_KEYS), default=["hopper", "portable"],
        help="passes to run, in order (repeat one to see the run-to-run spread)",
    )  # fmt: skip
    args = parser.parse_args()
    default_min_keys = hopper.MIN_KEYS, hopper.MIN_KEYS_NO_KV_TANGENT
    runs = []
    try:
        for run, name in enumerate(args.kernels):
            (hopper.MIN_KEYS, hopper.MIN_KEYS_NO_KV_TANGENT), label = MIN_KEYS[name]
            dev, step = tangent_pass(args.config)
            trace = f"{args.trace_dir}/{args.config}-{run}-{name}.json.gz" if args.trace_dir else None
            result = measure(step, dev, args.iters, trace)
            report(f"{args.config}, {label}", result)
            runs.append(dict(kernels=name, label=label, **result))
            del step
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        hopper.MIN_KEYS, hopper.MIN_KEYS_NO_KV_TANGENT = default_min_keys
    if args.json:
        meta = dict(config=args.config, iters=args.iters, torch=torch.__version__, commit=bench_models._commit())
        meta["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        with open(args.json, "w") as f:
            json.dump(dict(**meta, runs=runs), f, indent=1)


if __name__ == "__main__":
    main()
