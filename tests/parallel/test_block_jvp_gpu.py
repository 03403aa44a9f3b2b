"""On CUDA: per-block compiled JVP graphs (inductor, the Triton attention kernel inside) equal eager jvp.

The CPU tests (tests/parallel/test_compile.py) cover the mechanism with the reference attention; here
the graphs call the fused Triton op and inductor generates GPU code. Tiny float32 Wan and Cosmos.
"""

import copy

import pytest
import torch

from parallel.parallelize import apply_compile
from rcmfn.models import cosmos, wan
from rcmfn.tangent import dual_jvp

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _build(family):
    torch.manual_seed(0)
    if family == "wan":
        with torch.device("cuda"):
            return wan.WanModel(wan.WAN_TINY), (16, 3, 8, 12), wan.WAN_TINY.text_dim, 1000.0
    model = cosmos.random_cosmos(cosmos.CONFIGS["cosmos-tiny"], "cuda", torch.float32, seed=0)
    return model, (16, 2, 8, 12), 24, 1.0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["wan", "cosmos"])
def test_block_compiled_dual_jvp_equals_eager_jvp_on_cuda(family):
    eager, latent, text_dim, time_scale = _build(family)
    compiled = apply_compile(copy.deepcopy(eager))
    gen = torch.Generator(device="cuda").manual_seed(1)
    x, tx = (torch.randn(2, *latent, generator=gen, device="cuda") for _ in range(2))
    t, tt = time_scale * torch.rand(2, generator=gen, device="cuda"), torch.rand(2, generator=gen, device="cuda")
    context = torch.randn(2, 12, text_dim, generator=gen, device="cuda")
    with torch.no_grad():
        want, want_tangent = torch.func.jvp(lambda x, t: eager(x, t, context), (x, t), (tx, tt))
        dual_jvp(lambda x, t: compiled(x, t, context), (x, t), (tx, tt))  # eager, records the signatures
        compiled(x, t, context)  # compiles the blocks' JVP graphs
        got, got_tangent = dual_jvp(lambda x, t: compiled(x, t, context), (x, t), (tx, tt))
    assert all(len(b.forward.block_jvp.compiled) == 1 for b in compiled.blocks)
    errors = [((a - b).norm() / b.norm()).item() for a, b in ((got, want), (got_tangent, want_tangent))]
    assert errors[0] < 1e-4 and errors[1] < 1e-3, errors
