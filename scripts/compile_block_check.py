"""One real-width block's gradients under each compile variant against float64: `python -m scripts.compile_block_check`.

Bisects the compiled iteration's wrong gradients (the iteration issue): a Cosmos 2B block at 4,096 tokens
(or `--tiny`), bf16, random weights; gradients of a random linear functional of its output w.r.t. the
block's inputs (x, SiLU(e), the adaLN-LoRA term) and its parameters, for eager, inductor, aot_eager and
inductor with single reductions; relative errors against the same block in float64.
"""

import argparse
import copy
import json
import math

import torch
import torch.nn.functional as F

from rcmfn.models.cosmos.configs import CONFIGS
from rcmfn.models.cosmos.model import Block, init_random_, rope_angles


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def inputs(cfg, tokens, text_len, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = cfg.dim
    side = int(math.isqrt(tokens))
    angles = rope_angles((1, side, side), cfg.head_dim, cfg.rope_extrapolation, device)[:, None, :].double()
    return {
        "x": torch.randn(1, 1, tokens, D, generator=g).double().to(device),
        "silu_emb": F.silu(torch.randn(1, 1, 1, D, generator=g)).double().to(device),
        "lora": torch.randn(1, 1, 1, 3 * D, generator=g).double().to(device),
        "context": torch.randn(1, text_len, cfg.text_dim, generator=g).double().to(device),
        "rope_cos": torch.cos(angles),
        "rope_sin": torch.sin(angles),
        "probe": torch.randn(1, 1, tokens, D, generator=g).double().to(device),
    }


def grads(block, data, dtype, backend=None, options=None, sdpa=False):
    block = copy.deepcopy(block).to(dtype)
    if sdpa:
        block.self_attn.attention_fn = block.cross_attn.attention_fn = _sdpa
    fn = block.forward
    if backend is not None:
        fn = torch.compile(fn, fullgraph=True, backend=backend, options=options)
    args = {
        k: v.to(dtype) if v.is_floating_point() and k not in ("rope_cos", "rope_sin") else v for k, v in data.items()
    }
    args["rope_cos"], args["rope_sin"] = data["rope_cos"].float(), data["rope_sin"].float()
    if dtype == torch.float64:
        args["rope_cos"], args["rope_sin"] = data["rope_cos"], data["rope_sin"]
    wrt = {k: args[k].requires_grad_(True) for k in ("x", "silu_emb", "lora")}
    probe = args.pop("probe")
    out = fn(**args)
    loss = (out.double() * probe.double()).sum()
    params = dict(block.named_parameters())
    names = [*wrt, *params]
    got = torch.autograd.grad(loss, [*wrt.values(), *params.values()])
    return {"loss": loss.item(), **{n: g.double() for n, g in zip(names, got, strict=True)}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CONFIGS["cosmos-tiny"] if args.tiny else CONFIGS["cosmos2b"]
    tokens, text_len = (16, 8) if args.tiny else (4096, 512)
    with device:
        block = Block(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    for prm in block.parameters():
        prm.data = prm.data.float()
    init_random_(block, g)
    data = inputs(cfg, tokens, text_len, device)
    ref = grads(block, data, torch.float64)
    variants = {
        "eager bf16": dict(dtype=torch.bfloat16),
        "inductor bf16": dict(dtype=torch.bfloat16, backend="inductor"),
        "aot_eager bf16": dict(dtype=torch.bfloat16, backend="aot_eager"),
        "inductor bf16, no split reductions": dict(
            dtype=torch.bfloat16, backend="inductor", options={"split_reductions": False}
        ),
        "inductor bf16, no persistent reductions": dict(
            dtype=torch.bfloat16, backend="inductor", options={"triton.persistent_reductions": False}
        ),
        "inductor bf16, no mix-order reduction": dict(
            dtype=torch.bfloat16, backend="inductor", options={"triton.mix_order_reduction": False}
        ),
        "inductor fp32, no mix-order reduction": dict(
            dtype=torch.float32, backend="inductor", options={"triton.mix_order_reduction": False}
        ),
        "inductor bf16, sdpa": dict(dtype=torch.bfloat16, backend="inductor", sdpa=True),
        "eager fp32": dict(dtype=torch.float32),
        "inductor fp32": dict(dtype=torch.float32, backend="inductor"),
    }
    table = {}
    for name, kw in variants.items():
        torch._dynamo.reset()
        try:
            got = grads(block, data, **kw)
        except Exception as err:  # report and go on: this is a bisection
            print(f"{name}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        rel = {}
        for key, want in ref.items():
            if key == "loss":
                continue
            diff = torch.linalg.vector_norm((got[key] - want).nan_to_num(nan=1e300, posinf=1e300, neginf=-1e300))
            rel[key] = float(diff / torch.linalg.vector_norm(want).clamp_min(1e-300))
        table[name] = {"loss_rel": abs(got["loss"] - ref["loss"]) / abs(ref["loss"]), "rel": rel}
        worst = sorted(rel.items(), key=lambda kv: -kv[1])[:6]
        print(f"{name}: loss rel {table[name]['loss_rel']:.2e}; worst grads:", flush=True)
        print("   ", ", ".join(f"{k} {v:.2e}" for k, v in worst), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
