"""Bisect inductor for the wrong modulation gradients: `python -m scripts.compile_bisect [--case block|modulate]`.

`modulate` is the smallest piece of a Cosmos block that has the broadcast [B, 1, 1, D] inputs (SiLU(e) and
the adaLN-LoRA term) whose gradients came out wrong: an adaLN modulation feeding LayerNorm-modulate and
a gated residual add. `block` is the whole block. Prints whether the compiled gradients match float64,
then runs torch's CompilerBisector (backend, subsystem, and the pass or lowering at fault).
"""

import argparse
import copy
import json
import math

import torch

from rcmfn.models.cosmos.configs import CONFIGS
from rcmfn.models.cosmos.model import Block, Modulation, gated_add, init_random_, modulate
from scripts.compile_block_check import inputs


class ModulatedResidual(torch.nn.Module):
    def __init__(self, dim: int, lora_dim: int):
        super().__init__()
        self.mod = Modulation(dim, lora_dim, 3)

    def forward(self, x, silu_emb, lora, **_):
        shift, scale, gate = self.mod(silu_emb, lora)
        return gated_add(x, gate, modulate(x, shift, scale))


def make(case: str, tiny: bool, device):
    cfg = CONFIGS["cosmos-tiny"] if tiny else CONFIGS["cosmos2b"]
    tokens, text_len = (16, 8) if tiny else (4096, 512)
    with device:
        net = Block(cfg) if case == "block" else ModulatedResidual(cfg.dim, cfg.adaln_lora_dim)
    init_random_(net, torch.Generator(device=device).manual_seed(0))
    return net, inputs(cfg, tokens, text_len, device)


def grads(net, data, dtype, compiled: bool, options=None):
    net = copy.deepcopy(net).to(dtype)
    fn = torch.compile(net.forward, fullgraph=True, options=options) if compiled else net.forward
    args = {k: (v if k.startswith("rope") and dtype != torch.float64 else v.to(dtype)) for k, v in data.items()}
    if dtype != torch.float64:
        args["rope_cos"], args["rope_sin"] = data["rope_cos"].float(), data["rope_sin"].float()
    probe = args.pop("probe")
    wrt = [args[k].requires_grad_(True) for k in ("x", "silu_emb", "lora")]
    loss = (fn(**args).double() * probe.double()).sum()
    return [g.double() for g in torch.autograd.grad(loss, [*wrt, *net.parameters()])]


def relative_errors(got, want):
    return [
        float(torch.linalg.vector_norm((g - w).nan_to_num(nan=1e300, posinf=1e300, neginf=-1e300)))
        / max(float(torch.linalg.vector_norm(w)), 1e-300)
        for g, w in zip(got, want, strict=True)
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="modulate", choices=("modulate", "block"))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-bisect", action="store_true")
    p.add_argument(
        "--options", default="{}", help="inductor options as JSON, e.g. '{\"triton.mix_order_reduction\": false}'"
    )
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    net, data = make(args.case, args.tiny, device)
    want = grads(net, data, torch.float64, compiled=False)
    bound = 0.05 if dtype == torch.bfloat16 else 1e-3
    eager = max(relative_errors(grads(net, data, dtype, compiled=False), want))
    print(f"{args.case} {args.dtype}: eager worst relative gradient error {eager:.2e} (bound {bound})", flush=True)

    options = json.loads(args.options)

    def good() -> bool:
        torch._dynamo.reset()
        try:
            errors = relative_errors(grads(net, data, dtype, compiled=True, options=options or None), want)
        except Exception as err:  # a different failure (a half-disabled lowering): not this issue
            print(f"  compiled call failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
            return True
        worst = max(errors)
        print(f"  compiled relative gradient errors {', '.join(f'{e:.2e}' for e in errors)}", flush=True)
        return math.isfinite(worst) and worst < bound

    ok = good()
    print(f"compiled gradients {'match' if ok else 'DIFFER'}", flush=True)
    if ok or args.no_bisect:
        return
    from torch._inductor.compiler_bisector import CompilerBisector

    result = CompilerBisector.do_bisect(good)
    print("bisection:", result, flush=True)


if __name__ == "__main__":
    main()
