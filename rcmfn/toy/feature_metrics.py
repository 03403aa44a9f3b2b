"""Sample quality in a classifier's feature space: Frechet distance and k-NN precision / recall.

Used by the digits study (rcmfn/toy/digits.py) against held-out real images; all arithmetic is float64.
  frechet_distance  FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to the
                    two feature sets (Heusel et al. 2017, FID). Tr (S_a S_b)^(1/2) is the sum of the square
                    roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric PSD, so the
                    eigendecomposition is stable where sqrtm of the non-symmetric product is not.
  precision_recall  improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the
                    union of balls around its points with radius the distance to the point's k-th nearest
                    neighbour in the same set; precision = share of generated points inside the real
                    manifold, recall = share of real points inside the generated one (k = 3 in the paper).
"""

import torch


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition (negative round-off eigenvalues -> 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, d] and b [M, d] (unbiased covariances)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need feature sets [N >= 2, d] and [M >= 2, d]; got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _symmetric_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0.0).sqrt().sum()
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    return (mean_term + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * cross).item()


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance [N] from each point of x [N, d] to its k-th nearest other point of x."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must lie in [1, {x.shape[0] - 1}] for {x.shape[0]} points; got {k}")
    dist = torch.cdist(x.double(), x.double())
    dist.fill_diagonal_(float("inf"))
    return dist.kthvalue(k, dim=1).values


def manifold_share(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of points [N, d] within radii[j] of some centre j (centres [M, d]); boundary points count."""
    return (torch.cdist(points.double(), centres.double()) <= radii[None, :]).any(1).double().mean().item()


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of generated [M, d] against real [N, d] features, k-NN manifolds (see module doc)."""
    if real.dim() != 2 or generated.dim() != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"need feature sets [N, d] and [M, d]; got {tuple(real.shape)}, {tuple(generated.shape)}")
    precision = manifold_share(generated, real, knn_radii(real, k))
    recall = manifold_share(real, generated, knn_radii(generated, k))
    return precision, recall
