"""Tests for rcmfn/toy/feature_metrics.py: Frechet distance against a direct float64 computation and its
closed forms, k-NN precision / recall against a brute-force loop and on sets whose answer is known."""

import pytest
import torch
from scipy import linalg

from rcmfn.toy.feature_metrics import frechet_distance, knn_radii, precision_recall


def correlated(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """n points of a random non-isotropic Gaussian in d dimensions (float64)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix + shift + 0.3


@pytest.mark.parametrize(("n", "m", "d"), [(200, 150, 5), (97, 301, 17), (40, 40, 1)])
def test_frechet_distance_matches_the_definition_with_scipy_sqrtm(n, m, d):
    """FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), sqrtm of the product taken directly (float64)."""
    a, b = correlated(n, d, 0), correlated(m, d, 1, shift=0.5)
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = torch.cov(a.T).reshape(d, d).numpy(), torch.cov(b.T).reshape(d, d).numpy()
    direct = ((mu_a - mu_b) ** 2).sum() + (cov_a + cov_b - 2.0 * linalg.sqrtm(cov_a @ cov_b).real).trace()
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-8, abs=1e-10)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric():
    a, b = correlated(300, 12, 2), correlated(250, 12, 3)
    assert abs(frechet_distance(a, a)) < 1e-9 * torch.cov(a.T).trace().item()
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0.1


def test_frechet_distance_of_a_translated_set_is_the_squared_shift():
    """Equal covariances: the trace term vanishes and FD is |shift|^2."""
    a = correlated(120, 8, 4)
    shift = torch.linspace(-1.0, 2.0, 8, dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-8)


def test_frechet_distance_of_commuting_covariances_has_the_closed_form():
    """Diagonal covariances D_a, D_b (rotated sets): FD = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    z = (z - z.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whitened exactly
    scale_a, scale_b = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.2, 1.5]), torch.tensor([1.0, 1.0, 0.5, 2.0, 0.7, 0.1])
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64)).Q
    a, b = (z * scale_a.double()) @ rotation.T, (z * scale_b.double()) @ rotation.T + 1.0
    want = 6.0 + (scale_a.double() - scale_b.double()).square().sum().item()
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-8)


def brute_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    def radius(points, i):
        others = sorted(float((points[i] - points[j]).norm()) for j in range(points.shape[0]) if j != i)
        return others[k - 1]

    def share(points, centres):
        radii = [radius(centres, j) for j in range(centres.shape[0])]
        hits = [any(float((p - centres[j]).norm()) <= radii[j] for j in range(centres.shape[0])) for p in points]
        return sum(hits) / len(hits)

    return share(fake, real), share(real, fake)


@pytest.mark.parametrize(("n", "m", "k"), [(30, 41, 3), (25, 9, 1), (12, 12, 5)])
def test_precision_recall_matches_a_brute_force_loop(n, m, k):
    real, fake = correlated(n, 4, 6), correlated(m, 4, 7, shift=0.4)
    got = precision_recall(real, fake, k)
    assert got == pytest.approx(brute_precision_recall(real, fake, k), abs=1e-12)


def test_precision_recall_of_identical_sets_is_one_and_of_far_sets_zero():
    real = correlated(80, 5, 8)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_a_collapsed_generator_has_full_precision_and_little_recall():
    """Every generated point a copy of one real point (mode collapse): all inside the real manifold, while
    the generated manifold (radius 0) holds only that real point."""
    real = correlated(60, 5, 9)
    precision, recall = precision_recall(real, real[7:8].expand(40, -1))
    assert precision == 1.0 and recall == pytest.approx(1 / 60)


def test_knn_radii_is_the_kth_distance_to_another_point_and_checks_k():
    x = correlated(15, 3, 10)
    dist = torch.cdist(x, x)
    for i in (0, 6, 14):
        assert knn_radii(x, 2)[i] == torch.sort(torch.cat([dist[i, :i], dist[i, i + 1 :]])).values[1]
    with pytest.raises(ValueError, match="k must lie"):
        knn_radii(x, 15)
