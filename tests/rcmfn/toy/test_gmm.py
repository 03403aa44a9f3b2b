"""Tests for rcmfn/toy/gmm.py: the analytic mixture teacher is exact, finite and strict about inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.precond import trigflow_denoiser, x0_from_velocity
from rcmfn.time import trig_to_rf
from rcmfn.toy import gmm

SMALL = dict(class_norm=2.0, mode_offset=1.0, std_range=(0.3, 0.6), num_classes=2, modes_per_class=2)


def tiny_mixture(channels: int, **overrides) -> gmm.GaussianMixture:
    cfg = dict(SMALL, channels=channels, frames=1, height=1, width=1, seed=3)
    cfg.update(overrides)
    return gmm.build_mixture(gmm.MixtureConfig(**cfg))


def quadrature_posterior_mean(mixture, grid_axes, x_r, r, label):
    """E[x0 | x_r] by brute force on a tensor-product grid: sum x0 p(x0 | label) N(x_r; (1-r) x0, r^2)."""
    mesh = torch.stack(torch.meshgrid(*grid_axes, indexing="ij"), dim=-1).reshape(-1, len(grid_axes))
    log_prior = gmm.component_log_prior(mixture, torch.tensor([label]))[0]
    mu = mixture.means.reshape(-1, mixture.dim)
    s = mixture.stds.reshape(-1)
    log_p = torch.logsumexp(
        log_prior[None] - 0.5 * ((mesh[:, None] - mu[None]) ** 2).sum(-1) / s**2 - mixture.dim * torch.log(s)[None],
        dim=-1,
    )
    log_lik = -0.5 * ((x_r[None] - (1 - r) * mesh) ** 2).sum(-1) / r**2
    w = torch.softmax(log_p + log_lik, dim=0)
    return (w[:, None] * mesh).sum(0)


def test_build_mixture_is_deterministic_float64_and_normalised():
    a, b = gmm.build_mixture(), gmm.build_mixture()
    assert a.means.shape == (4, 3, 256) and a.means.dtype == torch.float64
    assert torch.equal(a.means, b.means) and torch.equal(a.text, b.text)
    assert not torch.equal(a.means, gmm.build_mixture(gmm.MixtureConfig(seed=1)).means)
    assert torch.allclose(a.log_weights.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    assert a.log_weights.exp().min() > 0.1


def test_default_modes_are_well_separated_and_data_is_unit_scale():
    m = gmm.build_mixture()
    mu = m.means.reshape(-1, m.dim)
    dist = torch.cdist(mu, mu) + torch.eye(mu.shape[0], dtype=torch.float64) * 1e9
    radius = math.sqrt(m.dim) * m.stds.max().item()  # typical distance of a sample to its mode
    assert dist.min() > 1.5 * radius
    x0 = gmm.sample_mixture(m, torch.arange(4).repeat(64), torch.Generator().manual_seed(0))
    assert 0.7 < x0.square().mean().item() < 1.3  # sigma_data = 1 is a fair assumption


@settings(deadline=None, max_examples=20)
@given(r=st.floats(0.02, 0.98), x=st.floats(-3.0, 3.0), label=st.sampled_from([gmm.UNCOND, 0, 1]))
def test_posterior_mean_matches_quadrature_in_1d(r, x, label):
    m = tiny_mixture(channels=1)
    grid = torch.linspace(-8.0, 8.0, 40_001, dtype=torch.float64)
    x_r = torch.tensor([x], dtype=torch.float64)
    expected = quadrature_posterior_mean(m, [grid], x_r, r, label)
    got = gmm.posterior_mean(
        m, x_r.reshape(1, 1, 1, 1, 1), torch.tensor([r], dtype=torch.float64), torch.tensor([label])
    )
    torch.testing.assert_close(got.flatten(), expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("label", [gmm.UNCOND, 1])
@pytest.mark.parametrize("r", [0.1, 0.6])
def test_posterior_mean_matches_quadrature_in_2d(label, r):
    m = tiny_mixture(channels=2)
    axis = torch.linspace(-7.0, 7.0, 801, dtype=torch.float64)
    x_r = torch.tensor([0.7, -1.3], dtype=torch.float64)
    expected = quadrature_posterior_mean(m, [axis, axis], x_r, r, label)
    got = gmm.posterior_mean(
        m, x_r.reshape(1, 2, 1, 1, 1), torch.tensor([r], dtype=torch.float64), torch.tensor([label])
    )
    torch.testing.assert_close(got.flatten(), expected, rtol=1e-6, atol=1e-6)


@settings(deadline=None, max_examples=25)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 4)),
    batch=st.integers(1, 5),
    t=st.floats(0.0, math.pi / 2),
    seed=st.integers(0, 2**16),
)
def test_trigflow_velocity_gives_posterior_mean(shape, batch, t, seed):
    c, f, h, w = shape
    m = gmm.build_mixture(
        gmm.MixtureConfig(
            channels=c,
            frames=f,
            height=h,
            width=w,
            text_tokens=3,
            text_dim=5,
            class_norm=3.0,
            mode_offset=2.0,
            seed=seed,
        )
    )
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, m.num_classes, (batch,), generator=g)
    x0 = gmm.sample_mixture(m, labels, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    tt = torch.full((batch,), t, dtype=torch.float64)
    x_t = math.cos(t) * x0 + math.sin(t) * eps
    denoise = trigflow_denoiser(gmm.velocity, time_dtype=torch.float64)
    F = denoise(m, x_t, tt, gmm.class_embeddings(m, labels))
    x_r = x_t / (math.cos(t) + math.sin(t))
    expected = gmm.posterior_mean(m, x_r, trig_to_rf(tt), labels)
    assert torch.isfinite(F).all()
    torch.testing.assert_close(x0_from_velocity(x_t, tt, F), expected, rtol=1e-9, atol=1e-9)


@settings(deadline=None, max_examples=20)
@given(r=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_velocity_equals_x_r_minus_posterior_mean_over_r(r, seed):
    m = gmm.build_mixture(gmm.MixtureConfig(height=4, width=2, seed=seed))
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([gmm.UNCOND, 0, 2, 3])
    x_r = (1 - r) * gmm.sample_mixture(m, labels, g) + r * torch.randn(4, 4, 1, 4, 2, generator=g, dtype=torch.float64)
    rr = torch.full((4,), r, dtype=torch.float64)
    expected = (x_r - gmm.posterior_mean(m, x_r, rr, labels)) / r
    torch.testing.assert_close(gmm.posterior_velocity(m, x_r, rr, labels), expected, rtol=1e-8, atol=1e-8)


def test_velocity_is_exact_at_r_zero_and_one():
    m = gmm.build_mixture()
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([gmm.UNCOND, 0, 1, 2, 3])
    x = gmm.sample_mixture(m, labels, g)
    zero, one = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    # r = 0: x_r = x0, so v = E[eps - x0 | x0] = -x0.
    torch.testing.assert_close(gmm.posterior_velocity(m, x, zero, labels), -x, rtol=1e-12, atol=1e-12)
    # r = 1: x_r = eps carries no information, so v = x_r - E[x0 | label].
    prior = gmm.component_log_prior(m, labels).exp()
    mean = (prior @ m.means.reshape(-1, m.dim)).reshape(x.shape)
    torch.testing.assert_close(gmm.posterior_velocity(m, x, one, labels), x - mean, rtol=1e-12, atol=1e-12)
    v_t0 = trigflow_denoiser(gmm.velocity)(m, x.float(), zero.float(), gmm.class_embeddings(m, labels))
    v_t1 = trigflow_denoiser(gmm.velocity)(m, x.float(), zero.float() + math.pi / 2, gmm.class_embeddings(m, labels))
    assert torch.isfinite(v_t0).all() and torch.isfinite(v_t1).all() and v_t0.dtype == torch.float32


def test_labels_from_cond_round_trips_through_bfloat16():
    m = gmm.build_mixture()
    labels = torch.tensor([3, gmm.UNCOND, 0, 1, 2, 0])
    cond = gmm.class_embeddings(m, labels)
    assert torch.equal(gmm.labels_from_cond(m, cond), labels)
    assert torch.equal(gmm.labels_from_cond(m, cond.to(torch.bfloat16)), labels)


def test_unknown_or_misshapen_embedding_raises():
    m = gmm.build_mixture()
    x = torch.randn(2, 4, 1, 8, 8)
    c_noise = torch.full((2,), 500.0)
    cond = gmm.class_embeddings(m, torch.tensor([0, 1])).clone()
    cond[1, 3, 7] += 0.5  # one token entry off: matches nothing
    with pytest.raises(ValueError, match=r"rows \[1\] match no class"):
        gmm.velocity(m, x, c_noise, cond)
    with pytest.raises(ValueError, match="condition must have shape"):
        gmm.velocity(m, x, c_noise, cond[:, :5])


def test_bad_labels_and_shapes_raise():
    m = gmm.build_mixture()
    with pytest.raises(ValueError, match="labels must lie in"):
        gmm.class_embeddings(m, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="labels must lie in"):
        gmm.sample_mixture(m, torch.tensor([-2]), torch.Generator())
    with pytest.raises(ValueError, match="x must have shape"):
        gmm.posterior_mean(m, torch.randn(2, 4, 1, 8, 6), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="r must have shape"):
        gmm.posterior_mean(m, torch.randn(2, 4, 1, 8, 8), torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="std_range"):
        gmm.MixtureConfig(std_range=(0.0, 0.3))


def test_assign_modes_recovers_the_generating_mode():
    m = gmm.build_mixture()
    g = torch.Generator().manual_seed(5)
    comp = torch.randint(0, 12, (200,), generator=g)
    x0 = m.means.reshape(12, -1)[comp] + m.stds.reshape(-1)[comp, None] * torch.randn(
        200, m.dim, generator=g, dtype=torch.float64
    )
    x0 = x0.reshape(200, *m.shape)
    assert torch.equal(gmm.assign_modes(m, x0, comp // 3), comp)
    assert torch.equal(gmm.assign_modes(m, x0, torch.full((200,), gmm.UNCOND)), comp)


def test_samples_follow_mode_weights_and_stds():
    m = gmm.build_mixture()
    n = 6000
    labels = torch.arange(4).repeat_interleave(n // 4)
    x0 = gmm.sample_mixture(m, labels, torch.Generator().manual_seed(7))
    comp = gmm.assign_modes(m, x0, labels)
    freq = torch.bincount(comp, minlength=12).double().reshape(4, 3) / (n // 4)
    torch.testing.assert_close(freq, m.log_weights.exp(), atol=0.04, rtol=0)
    sq = (x0.reshape(n, -1) - m.means.reshape(12, -1)[comp]).square().mean(-1)
    ratio = sq / m.stds.reshape(-1)[comp] ** 2
    assert abs(ratio.mean().item() - 1.0) < 0.01
    same = gmm.sample_mixture(m, labels[:8], torch.Generator().manual_seed(7))
    assert torch.equal(same, gmm.sample_mixture(m, labels[:8], torch.Generator().manual_seed(7)))


def test_unconditional_samples_cover_every_class():
    m = gmm.build_mixture()
    labels = torch.full((4000,), gmm.UNCOND)
    comp = gmm.assign_modes(m, gmm.sample_mixture(m, labels, torch.Generator().manual_seed(1)), labels)
    class_freq = torch.bincount(comp // 3, minlength=4).double() / 4000
    torch.testing.assert_close(class_freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.04, rtol=0)


def test_unchecked_velocity_compiles_fullgraph_and_equals_velocity():
    m = gmm.build_mixture()
    g = torch.Generator().manual_seed(8)
    labels = torch.tensor([2, gmm.UNCOND, 0, 3, 1])
    x = torch.randn(5, *m.shape, generator=g)
    c_noise = 1000.0 * torch.rand(5, generator=g)
    cond = gmm.class_embeddings(m, labels).float()
    expected = gmm.velocity(m, x, c_noise, cond)
    assert torch.equal(gmm.velocity_unchecked(m, x, c_noise, cond), expected)
    compiled = torch.compile(gmm.velocity_unchecked, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(m, x, c_noise, cond), expected, rtol=1e-6, atol=1e-6)
