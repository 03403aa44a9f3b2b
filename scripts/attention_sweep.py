"""Sweep the fused attention JVP kernel's block sizes on one shape (GPU): ms, TFLOP/s, registers.

`python scripts/attention_sweep.py [--shape B SQ SKV H D] [--dtype bf16]`. Prints one line per
config, fastest last, with the compiled kernel's register count and spills; for tuning TUNING_SPACE
in ops/attention/kernel.py, not for recording results (entrypoints/bench.py does that).
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
    args = parser.parse_args()
    batch, seq_q, seq_kv, heads, head_dim = args.shape
    dtype = DTYPES[args.dtype]
    make = lambda seq: torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype)
    inputs = [make(seq_q), make(seq_kv), make(seq_kv), make(seq_q), make(seq_kv), make(seq_kv)]
    flops = 12 * batch * heads * seq_q * seq_kv * head_dim
    sdpa_in = [x.transpose(1, 2) for x in inputs[:3]]
    sdpa_ms = triton.testing.do_bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(*sdpa_in), return_mode="median"
    )
    print(f"shape {args.shape} {args.dtype}: sdpa fwd {sdpa_ms:.3f} ms")
    results = []
    space = itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4])
    for block_m, block_n, warps, stages in space:
        if block_m == 64 and warps == 8:
            continue
        config = (block_m, block_n, warps, stages)
        outputs, call_args, meta = kernel._prepare(*inputs, head_dim**-0.5, None)
        try:
            compiled = kernel._launch(call_args, meta, seq_q, batch * heads, True, config)
            ms = triton.testing.do_bench(
                functools.partial(kernel._launch, call_args, meta, seq_q, batch * heads, True, config),
                return_mode="median",
            )
        except Exception as error:  # out of shared memory / registers for this config
            print(f"{config}: failed ({type(error).__name__})")
            continue
        regs, spills = getattr(compiled, "n_regs", -1), getattr(compiled, "n_spills", -1)
        results.append((ms, config, regs, spills))
    for ms, config, regs, spills in sorted(results, reverse=True):
        tflops = flops / ms * 1e-9
        ratio = ms / sdpa_ms
        print(f"{config}: {ms:.3f} ms  {tflops:.0f} TFLOP/s  {ratio:.2f}x sdpa  regs {regs} spills {spills}")


if __name__ == "__main__":
    main()
