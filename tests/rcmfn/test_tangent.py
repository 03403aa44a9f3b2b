"""rcmfn.tangent: the jvp tangent equals a float64 central difference; variants agree; outputs detached."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.precond import trigflow_denoiser
from rcmfn.tangent import scm_tangent
from tests.conftest import make_small_net


def _inputs(seed, batch=3):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, 1, 2, 2, generator=g, dtype=torch.float64)
    t = 0.05 + (math.pi / 2 - 0.1) * torch.rand(batch, generator=g, dtype=torch.float64)
    cond = torch.randn(batch, 4, 5, generator=g, dtype=torch.float64)
    F_T = torch.randn(batch, 3, 1, 2, 2, generator=g, dtype=torch.float64)
    return x_t, t, cond, F_T


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_jvp_tangent_equals_central_difference(seed):
    net, params = make_small_net(seed=seed % 7)
    denoise = trigflow_denoiser(net)
    x_t, t, cond, F_T = _inputs(seed)
    F, T = scm_tangent(denoise, params, x_t, t, cond, F_T, "jvp")
    cs = (torch.cos(t) * torch.sin(t)).view(-1, 1, 1, 1, 1)
    h = 1e-6
    plus = denoise(params, x_t + h * cs * F_T, t + h * cs.flatten(), cond)
    minus = denoise(params, x_t - h * cs * F_T, t - h * cs.flatten(), cond)
    torch.testing.assert_close(T, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(F, denoise(params, x_t, t, cond))


@pytest.mark.parametrize("method", ["semi_fd", "fd"])
def test_finite_difference_variants_approximate_the_jvp(method):
    net, params = make_small_net()
    denoise = trigflow_denoiser(net)
    x_t, t, cond, F_T = _inputs(3)
    _, T_exact = scm_tangent(denoise, params, x_t, t, cond, F_T, "jvp")
    _, T_fd = scm_tangent(denoise, params, x_t, t, cond, F_T, method, fd_step=1e-5)
    err = (T_fd - T_exact).norm() / T_exact.norm()
    assert err < 1e-3, f"{method} tangent relative error {err:.2e}"


def test_tangent_is_detached_and_builds_no_graph():
    net, params = make_small_net()
    params = params.apply(lambda p: p.detach().requires_grad_(True))
    x_t, t, cond, F_T = _inputs(4)
    for method in ("jvp", "semi_fd", "fd"):
        F, T = scm_tangent(trigflow_denoiser(net), params, x_t, t, cond, F_T, method)
        assert not F.requires_grad and not T.requires_grad and T.grad_fn is None


def test_tangent_rejects_bad_time_and_shapes():
    net, params = make_small_net()
    x_t, t, cond, F_T = _inputs(5)
    with pytest.raises(ValueError, match=r"\(0, pi/2\)"):
        scm_tangent(trigflow_denoiser(net), params, x_t, t + 2.0, cond, F_T)
    with pytest.raises(ValueError, match="teacher velocity shape"):
        scm_tangent(trigflow_denoiser(net), params, x_t, t, cond, F_T[:, :2])
    with pytest.raises(ValueError, match="unknown tangent method"):
        scm_tangent(trigflow_denoiser(net), params, x_t, t, cond, F_T, "exact")
