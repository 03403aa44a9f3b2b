"""bf16 torch.func.jvp through the real model code on CUDA: tangents keep their primals' dtypes.

On CUDA (torch 2.11) a bf16 layer_norm under torch.func.jvp returned a float32 tangent beside its
bf16 primal, and the next matmul failed; CPU runs never showed it. Tiny configs, real CUDA kernels.
"""

import pytest
import torch

from rcmfn.models import cosmos, wan
from rcmfn.models.registry import cast_params

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cosmos():
    model = cosmos.random_cosmos(cosmos.CONFIGS["cosmos-tiny"], "cuda", torch.bfloat16, seed=0)
    return cosmos.velocity_net(model), model, (16, 2, 8, 12), 24, 1.0


def _wan():
    with torch.device("cuda"):
        model = cast_params(wan.WanModel(wan.WAN_TINY), torch.bfloat16)
    return wan.velocity_net(model), model, (16, 3, 8, 12), wan.WAN_TINY.text_dim, 1000.0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("build", [_cosmos, _wan], ids=["cosmos", "wan"])
def test_bf16_jvp_on_cuda_matches_float64_direction(build):
    net, model, latent, text_dim, time_scale = build()
    params = dict(model.named_parameters())
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, *latent, generator=gen, device="cuda").bfloat16()
    t = time_scale * torch.rand(1, generator=gen, device="cuda")
    context = torch.randn(1, 12, text_dim, generator=gen, device="cuda").bfloat16()
    tx, tt = torch.randn(x.shape, generator=gen, device="cuda").bfloat16(), torch.ones_like(t)
    with torch.no_grad():
        out, tangent = torch.func.jvp(lambda x, t: net(params, x, t, context), (x, t), (tx, tt))
        # float64 reference: the same weights and inputs, central difference along (tx, tt).
        p64 = {k: v.double() for k, v in params.items()}
        f = lambda s: net(p64, x.double() + s * tx.double(), t.double() + s * tt.double(), context.double())
        h = 1e-4
        central = (f(h) - f(-h)) / (2 * h)
    assert out.dtype == tangent.dtype and torch.isfinite(tangent).all()
    rel = (tangent.double() - central).norm() / central.norm()
    assert rel < 5e-2, rel  # bf16 network end to end
