"""Sweep the fused attention JVP kernel's block sizes on one shape (GPU): ms, TFLOP/s, registers.

`python -m scripts.attention_sweep [--shape B SQ SKV H D] [--dtype bf16] [--configs BM,BN,W,S ...]`.
Prints one line per config, fastest last, with the compiled kernel's register count and spills; times
are CUDA-graph replays (device time), SDPA's forward timed the same way. For tuning TUNING_SPACE in
ops/attention/kernel.py, not for recording results (entrypoints/bench/ does that).
"""

import argparse
import functools
import itertools

import torch
import triton
import triton.testing

from ops.attention import kernel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=5, default=[1, 4096, 4096, 40, 128])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--configs", nargs="*", default=None, help="BLOCK_M,BLOCK_N,warps,stages (default: a grid)")
    args = parser.parse_args()
    batch, seq_q, seq_kv, heads, head_dim = args.shape
    dtype = DTYPES[args.dtype]
    make = lambda seq: torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype)
    inputs = [make(seq_q), make(seq_kv), make(seq_kv), make(seq_q), make(seq_kv), make(seq_kv)]
    flops = 12 * batch * heads * seq_q * seq_kv * head_dim
    sdpa_in = [x.transpose(1, 2) for x in inputs[:3]]
    sdpa_ms = triton.testing.do_bench_cudagraph(
        lambda: torch.nn.functional.scaled_dot_product_attention(*sdpa_in), return_mode="median"
    )
    print(f"shape {args.shape} {args.dtype}: sdpa fwd {sdpa_ms:.3f} ms")
    scale = head_dim**-0.5
    reference = kernel.attention_fwd_jvp(*inputs, scale, config=(64, 32, 4, 1))
    results = []
    if args.configs:
        configs = [tuple(int(x) for x in text.split(",")) for text in args.configs]
    else:
        grid = itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3])
        configs = [c for c in grid if not (c[0] == 64 and c[2] == 8)]
    for config in configs:
        outputs = [torch.full_like(x, float("nan")) for x in reference]
        launch = functools.partial(kernel._launch, inputs, outputs, scale, config)
        try:
            compiled = launch()
            ms = triton.testing.do_bench_cudagraph(launch, return_mode="median")
        except Exception as error:  # out of shared memory / registers for this config
            print(f"{config}: failed ({type(error).__name__}: {str(error)[:200]})")
            continue
        diff = max(
            ((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(outputs, reference, strict=True)
        )
        regs, spills = getattr(compiled, "n_regs", -1), getattr(compiled, "n_spills", -1)
        results.append((ms, config, regs, spills, diff))
    for ms, config, regs, spills, diff in sorted(results, reverse=True):
        tflops, ratio = flops / ms * 1e-9, ms / sdpa_ms
        print(f"{config}: {ms:.3f} ms {tflops:.0f} TFLOP/s {ratio:.2f}x sdpa", end=" ")
        print(f"regs {regs} spills {spills} rel. diff vs (64, 32, 4, 1) {diff:.1e}")


if __name__ == "__main__":
    main()
