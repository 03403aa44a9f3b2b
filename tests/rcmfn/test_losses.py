"""rcmfn.losses: closed-form gradients, warm-up, per-sample NaN masking, and a sweep over every loss."""

import math

import pytest
import torch

from rcmfn.losses import (
    dcm_loss,
    dmd_loss,
    fake_score_loss,
    scm_loss,
    scm_target_direction,
    tangent_warmup_ratio,
)


def _scm_inputs(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 1, 4, 4)
    F = torch.randn(shape, generator=g, dtype=torch.float64)
    F_T, T, x_t = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    t = 0.1 + 1.3 * torch.rand(batch, generator=g, dtype=torch.float64)
    return F, F_T, T, x_t, t


def test_scm_loss_value_and_gradient_equal_closed_form():
    F, F_T, T, x_t, t = _scm_inputs()
    F = F.requires_grad_(True)
    loss = scm_loss(F, F_T, T, x_t, t, warmup_ratio=0.7, loss_scale=100.0)
    loss.sum().backward()
    tb = t.view(-1, 1, 1, 1, 1)
    g = -torch.cos(tb) * torch.sqrt(1 - 0.49 * torch.sin(tb) ** 2) * (F.detach() - F_T) - (
        0.7 * torch.cos(tb) * torch.sin(tb) * x_t + T
    )
    g_hat = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1) + 0.1)
    torch.testing.assert_close(loss, 100 * (g_hat**2).flatten(1).sum(1))
    torch.testing.assert_close(F.grad, -2 * 100 * g_hat)


def test_scm_direction_at_full_warmup_is_cos_times_df_dt():
    F, F_T, T, x_t, t = _scm_inputs(1)
    tb = t.view(-1, 1, 1, 1, 1)
    # df/dt with f = cos t x - sin t F along dx/dt = F_T, where cos t sin t dF/dt = T (SPEC-rcm §2.7)
    df_dt = -torch.sin(tb) * x_t + torch.cos(tb) * F_T - torch.cos(tb) * F - T / torch.cos(tb)
    torch.testing.assert_close(scm_target_direction(F, F_T, T, x_t, t, 1.0), torch.cos(tb) * df_dt)


def test_tangent_warmup_ratio():
    assert tangent_warmup_ratio(0, 0) == 1.0
    assert tangent_warmup_ratio(250, 1000) == 0.25
    assert tangent_warmup_ratio(5000, 1000) == 1.0


def test_dmd_gradient_moves_sample_toward_real_minus_fake():
    g = torch.Generator().manual_seed(2)
    G = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fake, real = torch.randn(2, 3, 2, 5, generator=g, dtype=torch.float64)
    loss = dmd_loss(G, fake, real, loss_scale=1.0)
    loss.sum().backward()
    weight = (G.detach() - real).abs().flatten(1).mean(1).clamp_min(1e-5).view(-1, 1, 1)
    delta = (fake - real) / weight
    torch.testing.assert_close(loss, (delta**2).flatten(1).sum(1))
    torch.testing.assert_close(G.grad, 2 * delta)


def test_fake_score_loss_equals_velocity_matching():
    g = torch.Generator().manual_seed(3)
    G, eps, F_fake = torch.randn(3, 3, 4, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64)
    tb = t.view(-1, 1, 1)
    x_D = torch.cos(tb) * G + torch.sin(tb) * eps
    fake_x0 = torch.cos(tb) * x_D - torch.sin(tb) * F_fake
    target = torch.cos(tb) * eps - torch.sin(tb) * G
    torch.testing.assert_close(fake_score_loss(G, fake_x0, t), ((F_fake - target) ** 2).flatten(1).sum(1))


def _loss_cases():
    """(name, fn(inputs) -> [B] loss, inputs builder): one entry per loss for the sweep below."""

    def scm(x, y, z, t):
        return scm_loss(x, y, z, y * 0.5, t)

    def dmd(x, y, z, t):
        return dmd_loss(x, y, z)

    def fake(x, y, z, t):  # the fake score's prediction carries the graph
        return fake_score_loss(y, x, t)

    def dcm(x, y, z, t):
        return dcm_loss(x, y)

    return [("scm", scm), ("dmd", dmd), ("fake_score", fake), ("dcm", dcm)]


@pytest.mark.parametrize("name,fn", _loss_cases())
def test_every_loss_is_float64_per_sample_masks_one_nan_and_ignores_batch_order(name, fn):
    g = torch.Generator().manual_seed(7)
    x, y, z = torch.randn(3, 5, 2, 3, 3, generator=g, dtype=torch.float32)
    t = 0.1 + 1.3 * torch.rand(5, generator=g, dtype=torch.float64)
    clean = fn(x, y, z, t)
    assert clean.dtype == torch.float64 and clean.shape == (5,) and torch.isfinite(clean).all()
    assert (clean > 0).all(), f"{name} must be positive on random inputs"
    x_bad = x.clone().requires_grad_(True)
    poisoned = x_bad.detach().clone()
    poisoned[2, 0, 1, 1] = math.nan
    x_bad.data.copy_(poisoned)
    masked = fn(x_bad, y, z, t)
    assert masked[2] == 0
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(masked[keep], clean[keep])
    masked.sum().backward()
    assert torch.isfinite(x_bad.grad[keep]).all() and (x_bad.grad[2] == 0).all()
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(fn(x[perm], y[perm], z[perm], t[perm]), clean[perm])


@pytest.mark.parametrize("name,fn", _loss_cases())
def test_every_loss_compiled_equals_eager(name, fn):
    g = torch.Generator().manual_seed(8)
    x, y, z = torch.randn(3, 4, 2, 3, 3, generator=g, dtype=torch.float32)
    t = 0.1 + 1.3 * torch.rand(4, generator=g, dtype=torch.float64)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y, z, t), fn(x, y, z, t))
