"""The attention benchmark: `python -m entrypoints.bench attention [--only NAME ...] [--json PATH]` (GPU).

ops.attention (output, output + tangent) against SDPA's forward and the math reference at the models'
shapes; medians of triton.testing.do_bench (L2 flushed), forward rows also replayed from a CUDA graph.
"""

import torch

from entrypoints.bench.common import provenance

# name, batch, seq_q, seq_kv, heads, head_dim
ATTENTION_SHAPES = [
    ("self 32760 x12 d128", 1, 32760, 32760, 12, 128),
    ("self 4096 x40 d128", 1, 4096, 4096, 40, 128),
    ("cross 4096/512 x40 d128", 1, 4096, 512, 40, 128),
    ("self 8192 x16 d64 B2", 2, 8192, 8192, 16, 64),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _median_ms(fn, rep_ms: float) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=max(25, rep_ms // 10), rep=rep_ms, return_mode="median")


def _graph_median_ms(fn, rep_ms: float) -> float:
    """Median ms of fn replayed from a CUDA graph: the device's time without host dispatch."""
    import triton.testing

    # The graph holds ~rep / (time per call) calls: capped, or a 0.1 ms op captures thousands.
    return triton.testing.do_bench_cudagraph(fn, rep=min(rep_ms, 100.0), return_mode="median")


def _peak_extra_mib(fn) -> float:
    """Peak memory allocated while fn runs, beyond what was allocated before and what it returns."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    extra = torch.cuda.max_memory_allocated() - before - kept
    del result
    return extra / 2**20


def bench_attention_shape(name, batch, seq_q, seq_kv, heads, head_dim, dtype, rep_ms):
    """Time SDPA forward, our primal forward/backward, our fused JVP and math-attention JVP."""
    from ops import attention
    from ops.attention.reference import attention_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda seq: torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    q, k, v, tq, tk, tv = make(seq_q), make(seq_kv), make(seq_kv), make(seq_q), make(seq_kv), make(seq_kv)
    fwd_flops = 4 * batch * heads * seq_q * seq_kv * head_dim
    rows = []

    def add(what, fn, flops, flop_formula, graph=False):
        ms = _median_ms(fn, rep_ms)
        row = dict(shape=name, what=what, ms=ms, tflops=flops / ms * 1e-9, flops=flop_formula)
        if graph:  # device time alone: at 0.1 ms per call the host's dispatch can exceed the kernel's
            row["graph_ms"] = _graph_median_ms(fn, rep_ms)
            row["graph_tflops"] = flops / row["graph_ms"] * 1e-9
        rows.append(row)

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        sdpa = torch.nn.functional.scaled_dot_product_attention
        add("sdpa fwd", lambda: sdpa(qt, kt, vt), fwd_flops, "4BHSqSkvD", graph=True)
        add("ours fwd", lambda: attention(q, k, v), fwd_flops, "4BHSqSkvD", graph=True)
        jvp = lambda: torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
        add("ours fused fwd+jvp", jvp, 3 * fwd_flops, "12BHSqSkvD", graph=True)
        extra_mib = _peak_extra_mib(jvp)
    from ops.attention import hopper, kernel

    if hopper.preferred(q, k, v, tq, tk, tv):
        rows[-1]["config"] = f"Hopper kernel, BLOCK_N {hopper.CONFIGS[head_dim][0]}"
    else:
        rows[-1]["config"] = "portable kernel, " + kernel.tuned_config(seq_q, seq_kv, head_dim, dtype)
    with torch.no_grad():  # a tangent in q alone: the models' cross-attention (their text has none)
        jvp_q = lambda: torch.func.jvp(lambda q: attention(q, k, v), (q,), (tq,))
        add("ours fused fwd+jvp, no K/V tangent", jvp_q, 2 * fwd_flops, "8BHSqSkvD", graph=True)
        # Both Triton kernels alone, whichever the op took above (hopper.min_keys).
        scale = q.shape[-1] ** -0.5
        if hopper.supports(q, k, v, tq, tk, tv):
            on_hopper = lambda: hopper.attention_fwd_jvp_hopper(q, k, v, tq, tk, tv, scale)
            add("Hopper kernel fused fwd+jvp", on_hopper, 3 * fwd_flops, "12BHSqSkvD", graph=True)
            portable = lambda: kernel.attention_fwd_jvp(q, k, v, tq, tk, tv, scale)
            add("portable kernel fused fwd+jvp", portable, 3 * fwd_flops, "12BHSqSkvD", graph=True)
    sdpa_leaves = [x.detach().requires_grad_() for x in (qt, kt, vt)]
    sdpa_out = torch.nn.functional.scaled_dot_product_attention(*sdpa_leaves)
    grad = torch.randn_like(sdpa_out)
    add(
        "sdpa bwd",
        lambda: torch.autograd.grad(sdpa_out, sdpa_leaves, grad, retain_graph=True),
        2.5 * fwd_flops,
        "10BHSqSkvD",
    )
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves)
    grad_bshd = grad.transpose(1, 2)
    add(
        "ours bwd",
        lambda: torch.autograd.grad(out, leaves, grad_bshd, retain_graph=True),
        2.5 * fwd_flops,
        "10BHSqSkvD",
    )
    sdpa_out = out = None  # free the graphs before the math baseline
    # torch.func.jvp of math attention materialises several (B, H, Sq, Skv) float32 buffers.
    math_bytes = 8 * batch * heads * seq_q * seq_kv * 4
    if math_bytes < 0.6 * torch.cuda.mem_get_info()[0]:
        with torch.no_grad():
            math_jvp = lambda: torch.func.jvp(attention_reference, (q, k, v), (tq, tk, tv))
            add("math fwd+jvp (torch.func)", math_jvp, 3 * fwd_flops, "12BHSqSkvD")
    sdpa_ms, sdpa_graph_ms = rows[0]["ms"], rows[0]["graph_ms"]
    for row in rows:
        row["x_sdpa_fwd"] = row["ms"] / sdpa_ms
        if "graph_ms" in row:
            row["graph_x_sdpa_fwd"] = row["graph_ms"] / sdpa_graph_ms
    rows[2]["peak_extra_mib"] = extra_mib
    return rows


def run_attention(args) -> dict:
    import triton

    dtype = DTYPES[args.dtype]
    rows = []
    for shape in ATTENTION_SHAPES:
        if args.only and not any(key in shape[0] for key in args.only):
            continue
        rows.extend(bench_attention_shape(*shape, dtype=dtype, rep_ms=args.rep_ms))
        torch.cuda.empty_cache()
    print(f"{args.dtype}, {torch.cuda.get_device_name()}")
    print("| shape | what | ms | TFLOP/s | x SDPA fwd | CUDA graph ms | TFLOP/s | x SDPA fwd | FLOPs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f" (peak extra {r['peak_extra_mib']:.1f} MiB; {r['config']})" if "peak_extra_mib" in r else ""
        graph = "| - | - | -"
        if "graph_ms" in r:
            graph = f"| {r['graph_ms']:.3f} | {r['graph_tflops']:.0f} | {r['graph_x_sdpa_fwd']:.2f}"
        print(
            f"| {r['shape']} | {r['what']}{extra} | {r['ms']:.3f} | {r['tflops']:.0f} | "
            f"{r['x_sdpa_fwd']:.2f} {graph} | {r['flops']} |"
        )
    return dict(
        **provenance("attention", torch.device("cuda"), args.commit),
        triton=triton.__version__,
        dtype=args.dtype,
        rows=rows,
    )


def add_attention(subparsers) -> None:
    p = subparsers.add_parser("attention", help="ops.attention vs SDPA and math attention (GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype")
    p.add_argument("--rep-ms", type=float, default=1000.0, help="do_bench repetition budget per row (ms)")
    p.add_argument("--only", nargs="*", default=[], help="run only shapes whose name contains one of these")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.set_defaults(run=run_attention)
