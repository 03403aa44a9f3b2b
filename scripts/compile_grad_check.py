"""Where does the compiled iteration's gradient differ from eager? `python -m scripts.compile_grad_check`.

Builds a real-width network (`--model`, first `--blocks` blocks) exactly as the sharded trainer does
(FSDP of world size 1, float32 storage, bf16 compute, random init), runs the critic's fake-score loss
(and the student's DMD-style loss) eagerly and with `--compile`'s per-block compile on the same
inputs, and prints, per variant: the loss, the gradient norm, and the parameters and block outputs
whose gradients are non-finite or furthest from eager. One process, one GPU (or the CPU for tiny).
"""

import argparse
import json
import math
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from entrypoints.distributed import build_network, model_spec, teacher_weights
from entrypoints.distributed_config import DistributedConfig
from parallel.mesh import ParallelDims
from parallel.parallelize import ParallelConfig
from parallel.sharded_training import sharded_velocity_net
from rcmfn.losses import fake_score_loss
from rcmfn.precond import trigflow_denoiser, x0_from_velocity


def _cfg_for(spec, blocks: int):
    c = spec.config
    field = "num_layers" if spec.family == "wan" else "num_blocks"
    return replace(spec, config=replace(c, **{field: blocks}))


class _Args:
    seed = 0


def _inputs(spec, batch: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *spec.latent_shape, generator=g)
    noise = torch.randn(batch, *spec.latent_shape, generator=g)
    t = torch.rand(batch, generator=g, dtype=torch.float64) * 1.2 + 0.2
    cond = torch.randn(batch, spec.text_len, spec.text_dim, generator=g).to(torch.bfloat16)
    return x0.to(device), noise.to(device), t.to(device), cond.to(device)


def run_variant(spec, full_state, meshes, device, compile_: bool, batch, seed, ac):
    pcfg = ParallelConfig(param_dtype=torch.bfloat16, ac=ac, compile=compile_)
    module = build_network(spec, full_state, meshes, torch.float32, pcfg, device)
    fake = trigflow_denoiser(sharded_velocity_net(module, spec.timestep_scale))
    params = dict(module.named_parameters())
    block_grads = {}

    def hook(name):
        def fwd(_, __, out):
            if out.requires_grad:
                out.register_hook(lambda g: block_grads.__setitem__(name, g.detach().float()))

        return fwd

    for i, block in enumerate(module.blocks):
        block.register_forward_hook(hook(f"block{i}"))
    x0, noise, t, cond = _inputs(spec, batch, device, seed)
    tb = t.reshape(-1, *([1] * (x0.dim() - 1)))
    x_t = (torch.cos(tb) * x0.double() + torch.sin(tb) * noise.double()).float()
    out = {}
    for rep in range(2):  # the first compiled call compiles; the second runs the cached graphs
        block_grads.clear()
        F = fake(params, x_t, t, cond)
        loss = fake_score_loss(x0, x0_from_velocity(x_t, t, F.double()), t).sum()
        loss.backward()
        grads = {k: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for k, p in params.items()}
        grads = {k: g.detach().float().clone() for k, g in grads.items() if g is not None}
        for p in params.values():
            p.grad = None
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads.values()]))
        out = {
            "loss": loss.item(),
            "F_absmax": F.abs().max().item(),
            "grad_norm": norm.item(),
            "grads": grads,
            "block_grads": {k: v.clone() for k, v in block_grads.items()},
        }
        print(f"  rep {rep}: loss {out['loss']:.6e} grad_norm {out['grad_norm']:.6e} |F|max {out['F_absmax']:.3e}")
    del module
    return out


def _stats(g: torch.Tensor) -> dict:
    finite = torch.isfinite(g)
    gf = torch.where(finite, g, 0.0).double()
    return {
        "nonfinite": int((~finite).sum()),
        "absmax": float(gf.abs().max()),
        "norm": float(torch.linalg.vector_norm(gf)),
    }


def compare(eager: dict, compiled: dict) -> list[dict]:
    rows = []
    for kind in ("grads", "block_grads"):
        for name, want in eager[kind].items():
            got = compiled[kind].get(name)
            if got is None:
                rows.append({"kind": kind, "name": name, "missing": True})
                continue
            sg, sw = _stats(got), _stats(want)
            diff = torch.linalg.vector_norm((got.double() - want.double()).nan_to_num(posinf=1e300, neginf=-1e300))
            rel = float(diff) / max(sw["norm"], 1e-30)
            rows.append({"kind": kind, "name": name, "eager": sw, "compiled": sg, "rel_diff": rel})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cosmos2b")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ac", default="none")
    p.add_argument("--tiny", action="store_true", help="the family's tiny config (CPU smoke test)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    meshes = ParallelDims(1).build_meshes(device.type)
    cfg = _Args()
    cfg.seed, cfg.model = args.seed, args.model
    cfg.distributed = DistributedConfig(random_init=True, tiny=args.tiny)
    spec = _cfg_for(model_spec(cfg), args.blocks)
    full_state = teacher_weights(cfg, spec)
    results = {}
    for name, comp in (("eager", False), ("compiled", True)):
        print(f"{args.model} x{args.blocks} blocks, {name}:", flush=True)
        results[name] = run_variant(spec, full_state, meshes, device, comp, args.batch, args.seed, args.ac)
    rows = compare(results["eager"], results["compiled"])
    bad = [r for r in rows if not r.get("missing") and (r["compiled"]["nonfinite"] or r["rel_diff"] > 0.05)]
    print(f"{len(bad)} of {len(rows)} gradients differ by > 5 % or are non-finite:")
    for r in sorted(bad, key=lambda r: -r["rel_diff"] if math.isfinite(r["rel_diff"]) else -1e300)[:40]:
        print(" ", json.dumps(r))
    worst = sorted(rows, key=lambda r: -r.get("rel_diff", 0))[:10]
    print("largest relative differences:")
    for r in worst:
        print(" ", json.dumps(r))
    if args.json:
        summary = {
            k: {kk: vv for kk, vv in v.items() if kk not in ("grads", "block_grads")} for k, v in results.items()
        }
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
