"""Where the time of one attention call goes (GPU): host issue time against device time, per layer.

`python -m scripts.attention_overhead [--shape B SQ SKV H D]`. For each path from SDPA down to the
bare Triton launch, prints: host microseconds to issue one call (100 calls queued without a sync,
so the GPU never stalls the host), the CUDA-event median of `do_bench` (what `entrypoints.bench`
reports: host-bound when the host is slower than the kernels) and the CUDA-graph median (device
time alone). A diagnosis tool for small shapes; `entrypoints.bench` records results.
"""

import argparse
import time

import torch
import triton.testing
from torch.autograd import forward_ad

from ops import attention
from ops.attention import hopper, kernel


def _host_us(fn, calls: int = 100) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * issued / calls


def _dual_jvp(q, k, v, tq, tk, tv):
    with forward_ad.dual_level():
        out = attention(*(forward_ad.make_dual(x, t) for x, t in zip((q, k, v), (tq, tk, tv), strict=True)))
        return forward_ad.unpack_dual(out).tangent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=5, default=[1, 4096, 512, 40, 128])
    args = parser.parse_args()
    batch, seq_q, seq_kv, heads, head_dim = args.shape
    make = lambda seq: torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v, tq, tk, tv = make(seq_q), make(seq_kv), make(seq_kv), make(seq_q), make(seq_kv), make(seq_kv)
    scale = head_dim**-0.5
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    kernel.attention_fwd_jvp(q, k, v, tq, tk, tv, scale)  # autotune once
    config = kernel.tuned_config(seq_q, seq_kv, head_dim, q.dtype)
    outputs = kernel.attention_fwd_jvp(q, k, v, tq, tk, tv, scale)
    paths = {
        "sdpa forward": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),
        "ops.attention forward (no grad)": lambda: attention(q, k, v),
        "rcmfn::attention_fwd (with LSE)": lambda: torch.ops.rcmfn.attention_fwd(q, k, v, scale),
        "torch.func.jvp(ops.attention)": lambda: torch.func.jvp(attention, (q, k, v), (tq, tk, tv)),
        "forward_ad dual through ops.attention": lambda: _dual_jvp(q, k, v, tq, tk, tv),
        "rcmfn::attention_fwd_jvp": lambda: torch.ops.rcmfn.attention_fwd_jvp(q, k, v, tq, tk, tv, scale, "auto"),
        "kernel.attention_fwd_jvp (autotuner)": lambda: kernel.attention_fwd_jvp(q, k, v, tq, tk, tv, scale),
        "kernel launch, fixed config": lambda: kernel._launch((q, k, v, tq, tk, tv), outputs, scale, (128, 64, 8, 2)),
    }
    if hopper.supports(q, k, v, tq, tk, tv):
        paths["hopper.attention_fwd_jvp_hopper"] = lambda: hopper.attention_fwd_jvp_hopper(q, k, v, tq, tk, tv, scale)
    print(f"shape {args.shape} bf16, {torch.cuda.get_device_name()}, tuned config: {config}")
    print("| path | host us / call | do_bench ms | CUDA graph ms |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for name, fn in paths.items():
            host = _host_us(fn)
            events = triton.testing.do_bench(fn, return_mode="median")
            try:
                graph = triton.testing.do_bench_cudagraph(fn, return_mode="median")
            except Exception as error:  # a path that cannot be captured says why
                graph = f"n/a ({type(error).__name__})"
            graph = graph if isinstance(graph, str) else f"{graph:.4f}"
            print(f"| {name} | {host:.1f} | {events:.4f} | {graph} |")


if __name__ == "__main__":
    main()
