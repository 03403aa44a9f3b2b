"""GPU check of the Hopper (Gluon) attention JVP kernel against float64 and the portable kernel.

`python -m scripts.attention_hopper_check [--time]`: relative errors of O, tO and LSE on ragged and
model shapes (outputs poisoned with NaN first), then with --time the device times (CUDA-graph
replays) of SDPA's forward, the portable kernel and the Hopper kernel on the benchmark shapes (or on
`--shapes B,Sq,Skv,H,D,kv-tangent ...`).
"""

import argparse
import functools

import torch
import triton.testing

from ops.attention import hopper, kernel, reference

# (B, Sq, Skv, H, D, dtype, K/V tangent)
CHECKS = [
    (1, 777, 777, 2, 128, torch.bfloat16, True),
    (2, 300, 1025, 3, 64, torch.bfloat16, True),
    (2, 129, 77, 2, 128, torch.float16, True),
    (1, 1, 513, 2, 128, torch.bfloat16, True),
    (2, 1000, 512, 4, 128, torch.bfloat16, False),
    (1, 4096, 4096, 4, 128, torch.bfloat16, True),
    (2, 2048, 2048, 2, 64, torch.float16, True),
]
SHAPES = [  # (B, Sq, Skv, H, D, K/V tangent)
    (1, 32760, 32760, 12, 128, True),
    (1, 4096, 4096, 40, 128, True),
    (1, 4096, 512, 40, 128, False),
    (2, 8192, 8192, 16, 64, True),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(batch, seq_q, seq_kv, heads, head_dim, dtype, kv_tangent, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda s: torch.randn(batch, s, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    q, k, v, tq = make(seq_q), make(seq_kv), make(seq_kv), make(seq_q)
    tk, tv = (make(seq_kv), make(seq_kv)) if kv_tangent else (None, None)
    return q, k, v, tq, tk, tv


def poisoned(q):
    batch, seq_q, heads, head_dim = q.shape
    out = torch.full((batch, seq_q, heads, head_dim), float("nan"), dtype=q.dtype, device=q.device)
    return out, out.clone(), torch.full((batch, heads, seq_q), float("nan"), device=q.device)


def check():
    worst = 0.0
    for batch, seq_q, seq_kv, heads, head_dim, dtype, kvt in CHECKS:
        x = inputs(batch, seq_q, seq_kv, heads, head_dim, dtype, kvt)
        scale = head_dim**-0.5
        assert hopper.supports(*x), "hopper path refused"
        ref = reference.attention_jvp_reference(*(t.double() if t is not None else None for t in x), scale)
        ours = hopper.attention_fwd_jvp_hopper(*x, scale, poisoned(x[0]))
        portable = kernel.attention_fwd_jvp(*x, scale, outputs=poisoned(x[0]))
        errs = [rel(a, r) for a, r in zip(ours, ref, strict=True)]
        errs_p = [rel(a, r) for a, r in zip(portable, ref, strict=True)]
        nan = any(torch.isnan(t).any().item() for t in ours)
        worst = max(worst, *errs)
        print(
            f"{(batch, seq_q, seq_kv, heads, head_dim, str(dtype)[6:], kvt)}: hopper O/tO/LSE "
            f"{errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e} portable {errs_p[0]:.1e}/{errs_p[1]:.1e}/{errs_p[2]:.1e}"
            f"{' NaN!' if nan else ''}",
            flush=True,
        )
    print(f"worst hopper error {worst:.1e}")


def bench(fn, *args, **kwargs):
    return triton.testing.do_bench_cudagraph(functools.partial(fn, *args, **kwargs), rep=200, return_mode="median")


def time_shapes(configs, shapes=SHAPES):
    for batch, seq_q, seq_kv, heads, head_dim, kvt in shapes:
        x = inputs(batch, seq_q, seq_kv, heads, head_dim, torch.bfloat16, kvt)
        scale = head_dim**-0.5
        sdpa = bench(torch.nn.functional.scaled_dot_product_attention, *[t.transpose(1, 2) for t in x[:3]])
        outs = poisoned(x[0])
        portable = bench(kernel.attention_fwd_jvp, *x, scale, outputs=outs)
        flops = (12 if kvt else 8) * batch * heads * seq_q * seq_kv * head_dim
        line = f"{(batch, seq_q, seq_kv, heads, head_dim, kvt)}: sdpa {sdpa:.3f}"
        line += f" portable {portable:.3f} ({portable / sdpa:.2f}x)"
        for config in configs.get(head_dim, [None]):
            ms = bench(hopper.attention_fwd_jvp_hopper, *x, scale, outs, config)
            line += f" | hopper{config or ''} {ms:.3f} ms {flops / ms * 1e-9:.0f} TF/s {ms / sdpa:.2f}x"
        print(line, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--configs", nargs="*", default=[], help="D:BLOCK_N,regs,loader regs,ping-pong")
    parser.add_argument("--shapes", nargs="*", default=[], help="B,Sq,Skv,H,D,kv-tangent(0/1) to time")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 check")
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    if not args.no_check:
        check()
    if args.time:
        configs = {64: [None], 128: [None]}
        for text in args.configs:
            head_dim, cfg = text.split(":")
            configs[int(head_dim)].append(tuple(int(v) for v in cfg.split(",")))
        shapes = [tuple(int(v) for v in text.split(",")) for text in args.shapes] or SHAPES
        time_shapes(configs, [(*shape[:5], bool(shape[5])) for shape in shapes])


if __name__ == "__main__":
    main()
