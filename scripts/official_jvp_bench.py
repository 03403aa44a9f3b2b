"""Time the OFFICIAL rCM code's hand-written per-layer JVP of Wan2.1 1.3B (NVlabs/rcm), next to its forward.

Their code is imported, never copied: `--official-root` (default `.official/rcm`, git-ignored) holds an export of
github.com/NVlabs/rcm (`git --git-dir=<mirror> archive HEAD | tar -x -C .official/rcm`, ~3 MiB). Files used:
rcm/networks/wan2pt1_jvp.py, rcm/utils/{jvp_helper,flash_attention_jvp_triton,a2a_cp,attention,context_parallel,
selective_activation_checkpoint}.py.

Net: `rcm.networks.wan2pt1_jvp.WanModel_JVP` with their 1.3B T2V config (dim 1536, 30 layers, 12 heads, ffn 8960,
text 512 x 4096, patch (1, 2, 2), 16 -> 16 channels), random seeded init (their zero-initialised output head re-drawn
so outputs are not all zero), cast with `net.to(bf16)` as their trainer, blocks and head wrapped as in their 480p
experiment (`sac_config.mode="block_wise"`: checkpoint_wrapper, which saves nothing under no_grad), TF32 on as their
trainer sets it (their modulation/FFN/head/time MLP run under autocast("cuda", float32)). Rows, under no_grad:
  forward  net(x_B_C_T_H_W=x, timesteps_B_T=t, crossattn_emb=ctx)                           (attention: torch SDPA)
  jvp      net(x_B_C_T_H_W=(x, t_x), timesteps_B_T=(t, t_t), crossattn_emb=ctx, withT=True)  (their Triton kernel)
the call `T2VDistillModel_rCM.student_F_withT` makes in the sCM step: tangents on the noisy latent (times c_in) and
on the time (c_noise), none on the text. Timing: a first call (includes Triton autotuning), `--warmup` untimed
calls, then the median of `--iters` calls by CUDA events; peak memory over the timed calls.

Stubbed in sys.modules before import (nothing here calls them): flash_attn.layers.rotary.apply_rotary_emb (only
for rope_apply(fused=True); the network passes fused=False), flash_attn.flash_attn_interface._flash_attn_(varlen_)
backward (only in their kernel's autograd backward), imaginaire.utils.log (loguru; -> logging) and
imaginaire.utils.distributed (pynvml; only under context parallelism). No flash_attn is needed: their plain forward
uses torch SDPA already (`jvp_helper.torch_attention_op`), so no routing stub is required.

CPU: their RoPE cache (hard-coded `.cuda()`) is filled on the device here, autocast("cuda") is inactive, so use
`--dtype float32` (bf16 fails in their time MLP without it); their Triton kernel cannot launch on CPU, and
`--jvp-attention reference` swaps it for torch.func.jvp of a math attention (checks, not timing).

GPU (repo root; carry .official/rcm with the working tree):
  TRITON_PRINT_AUTOTUNING=1 python scripts/official_jvp_bench.py --json out/official_jvp.json 2>&1 \
      | tee out/official_jvp.log
CPU smoke test:
  python scripts/official_jvp_bench.py --device cpu --dtype float32 --layers 1 --frames 2 --height 8 --width 8 \
      --warmup 0 --iters 1 --jvp-attention reference
"""

import argparse
import functools
import json
import logging
import statistics
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

import torch

STUBBED = []


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    STUBBED.append(name)
    return module


def _unavailable(what: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{what} is stubbed by official_jvp_bench.py (not needed for a no-grad forward)")

    return fail


def import_official(root: Path):
    """Install the stubs, put `root` on sys.path and import their JVP network and helpers."""
    if not (root / "rcm/networks/wan2pt1_jvp.py").is_file():
        sys.exit(f"no rcm/networks/wan2pt1_jvp.py under {root}: export NVlabs/rcm there (see docstring)")
    for package in ("flash_attn", "flash_attn.layers", "imaginaire", "imaginaire.utils"):
        _stub(package, __path__=[])
    _stub("flash_attn.layers.rotary", apply_rotary_emb=_unavailable("flash_attn rotary"))
    backward = _unavailable("flash_attn backward")
    _stub("flash_attn.flash_attn_interface", _flash_attn_backward=backward, _flash_attn_varlen_backward=backward)
    logger = logging.getLogger("official_rcm")
    levels = ("debug", "info", "warning", "error", "critical")
    _stub("imaginaire.utils.log", **{level: getattr(logger, level) for level in levels})
    _stub("imaginaire.utils.distributed")
    sys.path.insert(0, str(root))
    from rcm.networks import wan2pt1_jvp
    from rcm.utils import jvp_helper

    return wan2pt1_jvp, jvp_helper


def reference_attention_withT(q_withT, k_withT, v_withT):
    """(B, S, H, D) primal/tangent pairs -> torch.func.jvp of float32 math attention (CPU checks only)."""

    def attention(q, k, v):
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)

    primals, tangents = zip(q_withT, k_withT, v_withT, strict=True)
    return torch.func.jvp(attention, primals, tangents)


def build_net(wan, jvp_helper, args, device, dtype):
    config = dict(dim=1536, eps=1e-6, ffn_dim=8960, freq_dim=256, in_dim=16, num_heads=12, num_layers=args.layers)
    config.update(out_dim=16, text_len=512, text_dim=4096, patch_size=(1, 2, 2), model_type="t2v")
    with torch.device(device):
        net = wan.WanModel_JVP(**config, sac_config=wan.SACConfig(mode=args.sac))
        torch.nn.init.normal_(net.head.head.weight, std=0.02)  # their init zeroes the output head
    net = net.to(dtype=dtype)  # as their trainer's on_train_start; parameters keep requires_grad
    if device.type != "cuda":  # their cache_parameters() hard-codes .cuda(); same values on `device`
        rope, arange = net.rope_position_embedding, functools.partial(torch.arange, device=device)
        rope.seq = arange(max(rope.max_h, rope.max_w, rope.max_t)).float()
        rope.dim_spatial_range = arange(0, rope._dim_h, 2).float() / rope._dim_h
        rope.dim_temporal_range = arange(0, rope._dim_t, 2).float() / rope._dim_t
        rope._is_initialized = True
    if args.jvp_attention == "reference":
        for module in net.modules():
            if isinstance(module, jvp_helper.MinimalA2AAttnOpWithT):
                module.local_attn_T = reference_attention_withT
    return net, config


def bench(name, fn, args, device):
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row = {"name": name}
    try:
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        row["first_call_s"] = time.perf_counter() - start
        print(f"[{name}] first call {row['first_call_s']:.2f} s", flush=True)
        for _ in range(args.warmup):
            out = fn()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            row["base_gib"] = torch.cuda.memory_allocated() / 2**30
        times = []
        for i in range(args.iters):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                out = fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                start = time.perf_counter()
                out = fn()
                times.append(1e3 * (time.perf_counter() - start))
            print(f"[{name}] iter {i}: {times[-1]:.1f} ms", flush=True)
        row.update(median_ms=statistics.median(times), min_ms=min(times), times_ms=times)
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return row, out
    except Exception as error:  # record it and go on to the next row
        frame = traceback.extract_tb(error.__traceback__)[-1]
        row["error"] = f"{type(error).__name__}: {error} (at {frame.filename}:{frame.lineno} in {frame.name})"
        print(f"[{name}] FAILED {row['error']}", flush=True)
        traceback.print_exc()
        return row, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-root", default=".official/rcm")
    parser.add_argument("--frames", type=int, default=21, help="latent frames T")
    parser.add_argument("--height", type=int, default=60, help="latent height H (even)")
    parser.add_argument("--width", type=int, default=104, help="latent width W (even)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sac", default="block_wise", choices=["block_wise", "mm_only", "none"])
    parser.add_argument("--no-tf32", action="store_true", help="leave TF32 off (their trainer turns it on)")
    parser.add_argument("--jvp-attention", default="triton", choices=["triton", "reference"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tune-subset",
        action="store_true",
        help="autotune their kernel over BLOCK_N in {32, 64}, stages in {3, 4} only (16 of 36 configs: compile time)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type != "cuda":  # their autocast("cuda", float32) regions are inactive here
        warnings.filterwarnings("ignore", message="CUDA is not available")
    wan, jvp_helper = import_official(Path(args.official_root).resolve())
    print(f"imported {wan.__file__} (stubbed: {', '.join(STUBBED)})", flush=True)
    if args.tune_subset:
        from rcm.utils import flash_attention_jvp_triton as their_kernel

        for tuner in vars(their_kernel).values():
            if hasattr(tuner, "configs") and hasattr(tuner, "cache"):
                keep = [c for c in tuner.configs if c.kwargs.get("BLOCK_N") in (32, 64) and c.num_stages in (3, 4)]
                print(f"their autotuner {getattr(tuner, 'fn', tuner)}: {len(keep)} of {len(tuner.configs)} configs")
                tuner.configs = keep
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    net, config = build_net(wan, jvp_helper, args, device, dtype)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"built WanModel_JVP {n_params / 1e9:.3f} B params in {time.perf_counter() - start:.1f} s", flush=True)

    b, t, h, w = args.batch, args.frames, args.height, args.width
    generator = torch.Generator(device).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    x, t_x = randn(b, 16, t, h, w), randn(b, 16, t, h, w)
    time_in = (torch.rand(b, 1, generator=generator, device=device) * 1000).to(dtype)  # c_noise = 1000 t_rf
    t_time = randn(b, 1)
    context = randn(b, 512, 4096)
    tokens = t * (h // 2) * (w // 2)
    print(f"inputs x {tuple(x.shape)} ({tokens} tokens), t {tuple(time_in.shape)}, context {tuple(context.shape)}")

    def forward():
        return net(x_B_C_T_H_W=x, timesteps_B_T=time_in, crossattn_emb=context)

    def jvp():
        return net(x_B_C_T_H_W=(x, t_x), timesteps_B_T=(time_in, t_time), crossattn_emb=context, withT=True)

    with torch.no_grad():
        row_fwd, out_fwd = bench("forward", forward, args, device)
        row_jvp, out_jvp = bench("jvp", jvp, args, device)
    rows = [row_fwd, row_jvp]
    check = {}
    if out_fwd is not None and out_jvp is not None:  # primal against the plain forward; tangent sanity
        (primal, tangent), rms = (o.float() for o in out_jvp), lambda v: v.float().pow(2).mean().sqrt().item()
        check = dict(primal_max_abs_diff=(primal - out_fwd.float()).abs().max().item(), forward_rms=rms(out_fwd))
        check.update(tangent_rms=rms(tangent), tangent_finite=bool(tangent.isfinite().all()))
        print(f"check: {check}", flush=True)

    print("\n| row | median ms | min ms | first call s | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        cells = [r.get("error", "")[:90]] if "error" in r else [r["median_ms"], r["min_ms"], r["first_call_s"]]
        cells += [r.get("peak_gib", "-")] if "error" not in r else []
        print(f"| {r['name']} | " + " | ".join(f"{c:.2f}" if isinstance(c, float) else c for c in cells) + " |")
    ratio = row_jvp["median_ms"] / row_fwd["median_ms"] if "median_ms" in row_jvp and "median_ms" in row_fwd else None
    if ratio:
        print(f"jvp / forward = {ratio:.2f}x")

    env = dict(torch=torch.__version__, device=str(device), argv=sys.argv, stubbed=STUBBED)
    if device.type == "cuda":
        import triton

        env.update(triton=triton.__version__, gpu=torch.cuda.get_device_name(device), tf32=not args.no_tf32)
        with torch.autocast("cuda", dtype=torch.float32):  # what their autocast(float32) does to a bf16 linear
            probe = torch.ones(8, 8, device=device, dtype=dtype)
            env["autocast_fp32_linear_dtype"] = str(torch.nn.functional.linear(probe, probe).dtype)
    config = {**config, "patch_size": list(config["patch_size"]), **vars(args), "tokens": tokens}
    result = dict(config=config, env=env, rows=rows, jvp_over_forward=ratio, check=check)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
