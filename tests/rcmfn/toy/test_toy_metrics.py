"""Tests for rcmfn/toy/metrics.py: exact samples score perfectly, collapse and blur are detected."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.toy import gmm
from rcmfn.toy import metrics as toy_metrics

MIXTURE = gmm.build_mixture()
LABELS = torch.arange(4).repeat(500)  # 500 samples per class


def test_exact_samples_have_full_coverage_small_tv_unit_spread():
    x = gmm.sample_mixture(MIXTURE, LABELS, torch.Generator().manual_seed(0))
    m = toy_metrics.toy_metrics(MIXTURE, x, LABELS, torch.Generator().manual_seed(1))
    assert m.coverage == 1.0 and m.class_match == 1.0
    assert m.weight_tv < 0.06
    assert abs(m.spread - 1.0) < 0.02 and m.off_mode == 0.0
    # finite-sample floor of sliced W2 between two exact sets, well below a 0.5-per-axis shift
    shifted = toy_metrics.toy_metrics(MIXTURE, x + 0.5, LABELS, torch.Generator().manual_seed(1))
    assert m.sliced_w2 < 0.1 < 0.4 < shifted.sliced_w2


def test_unconditional_group_is_scored_over_all_modes():
    labels = torch.full((2000,), gmm.UNCOND)
    x = gmm.sample_mixture(MIXTURE, labels, torch.Generator().manual_seed(2))
    m = toy_metrics.toy_metrics(MIXTURE, x, labels, torch.Generator().manual_seed(3))
    assert m.coverage == 1.0 and m.weight_tv < 0.08 and abs(m.spread - 1.0) < 0.02


def test_collapsed_samples_lose_coverage_and_spread():
    means = MIXTURE.means[LABELS, 0].reshape(-1, *MIXTURE.shape)  # every sample on its class's mode 0
    x = means + 1e-3 * torch.randn(means.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    m = toy_metrics.toy_metrics(MIXTURE, x, LABELS, torch.Generator().manual_seed(5))
    weights = MIXTURE.log_weights.exp()
    assert m.coverage == pytest.approx(1 / 3)
    assert m.weight_tv == pytest.approx((1 - weights[:, 0]).mean().item(), abs=1e-12)
    assert m.spread < 1e-3 and m.class_match == 1.0


def test_blurred_samples_have_spread_above_one():
    g = torch.Generator().manual_seed(6)
    comp = torch.multinomial(gmm.component_log_prior(MIXTURE, LABELS).exp(), 1, generator=g).flatten()
    noise = torch.randn(LABELS.shape[0], MIXTURE.dim, generator=g, dtype=torch.float64)
    x = MIXTURE.means.reshape(12, -1)[comp] + 2.0 * MIXTURE.stds.reshape(-1)[comp, None] * noise
    m = toy_metrics.toy_metrics(MIXTURE, x.reshape(-1, *MIXTURE.shape), LABELS, torch.Generator())
    assert m.spread == pytest.approx(4.0, rel=0.02) and m.coverage == 1.0 and m.off_mode < 0.05


def test_samples_between_modes_are_counted_off_mode():
    x = gmm.sample_mixture(MIXTURE, LABELS, torch.Generator().manual_seed(10))
    between = 0.5 * (MIXTURE.means[LABELS[:100], 0] + MIXTURE.means[LABELS[:100], 1])
    x[:100] = between.reshape(100, *MIXTURE.shape)  # 5% of the set, on mid-points of two modes
    m = toy_metrics.toy_metrics(MIXTURE, x, LABELS, torch.Generator().manual_seed(11))
    assert m.off_mode == pytest.approx(0.05) and m.coverage == 1.0


def test_wrong_class_samples_lower_class_match():
    x = gmm.sample_mixture(MIXTURE, (LABELS + 1) % 4, torch.Generator().manual_seed(7))
    m = toy_metrics.toy_metrics(MIXTURE, x, LABELS, torch.Generator().manual_seed(8))
    assert m.class_match == 0.0 and m.spread > 10.0


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 40), dim=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_sliced_w2_is_zero_on_itself_exact_for_shifts_and_order_free(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=g, dtype=torch.float64)
    b = torch.randn(n, dim, generator=g, dtype=torch.float64)
    u = toy_metrics.random_directions(dim, 16, g)
    delta = torch.randn(dim, generator=g, dtype=torch.float64)
    assert toy_metrics.sliced_wasserstein(a, a[torch.randperm(n, generator=g)], u) < 1e-12
    # a pure shift keeps the sort order on every line: W2 along u is exactly |u . delta|
    exact = (u @ delta).square().mean().sqrt().item()
    assert toy_metrics.sliced_wasserstein(a, a + delta, u) == pytest.approx(exact, rel=1e-10, abs=1e-12)
    ab, ba = toy_metrics.sliced_wasserstein(a, b, u), toy_metrics.sliced_wasserstein(b, a, u)
    assert ab == pytest.approx(ba, rel=1e-12, abs=1e-15)
    far = toy_metrics.sliced_wasserstein(a, a + 3 * delta, u)
    assert far == pytest.approx(3 * exact, rel=1e-10, abs=1e-12)


def test_expected_counts_sum_to_batch_and_match_weights():
    counts = toy_metrics.expected_counts(MIXTURE, LABELS)
    assert counts.sum().item() == pytest.approx(LABELS.shape[0])
    torch.testing.assert_close(counts.reshape(4, 3), 500 * MIXTURE.log_weights.exp())


def test_bad_inputs_raise():
    x = gmm.sample_mixture(MIXTURE, LABELS[:8], torch.Generator().manual_seed(9))
    with pytest.raises(ValueError, match="differ in count"):
        toy_metrics.toy_metrics(MIXTURE, x, LABELS[:7], torch.Generator())
    x[3, 0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        toy_metrics.toy_metrics(MIXTURE, x, LABELS[:8], torch.Generator())
    with pytest.raises(ValueError, match="equal count"):
        toy_metrics.sliced_wasserstein(x[:3], x[:4], toy_metrics.random_directions(256, 4, torch.Generator()))
