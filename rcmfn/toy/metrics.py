"""Sample-quality metrics of a toy sample set against the analytic Gaussian mixture.

SPEC-rcm §6 (what the samplers produce) judged on the toy teacher of `rcmfn.toy.gmm`. Samples are
grouped by label (each class, and UNCOND if present); each sample is assigned to the mode of highest
posterior responsibility at r = 0 within its label's modes (`gmm.assign_modes`). Per group:
  coverage      fraction of the group's modes that receive at least min_share of their expected count
                n_group * w_k (and at least one sample); 1 = no dropped mode.
  weight_tv     total-variation distance 0.5 * sum_k |n_k / n_group - w_k| between the empirical and
                the true mode weights; 0 = right proportions.
  spread        mean over samples of |x - mu_a|^2 / (dim s_a^2) for the assigned mode a; an exact sample
                gives chi^2_dim / dim, mean 1; < 1 collapse towards the mode centre, > 1 blur.
  off_mode      fraction of samples displaced from their mode towards another mode of the group by more
                than 5 s_a along the line joining the two means (an exact sample: about 3e-7 per other
                mode): samples strung between modes, which spread hides because in high dimension a
                mid-point between two modes is no further from either than a typical exact sample.
  sliced_w2     sliced Wasserstein-2 distance to an equally sized set of exact samples of the same
                labels: sqrt(mean over random unit directions of W2^2 of the 1-D projections).
  class_match   fraction of samples whose nearest mode over all classes belongs to their own label
                (UNCOND samples always count as matched).
Group values are averaged with equal weight per group. All arithmetic is float64.
"""

from dataclasses import asdict, dataclass

import torch

from rcmfn.toy import gmm

OFF_MODE_SIGMAS = 5.0  # threshold of `off_mode`, in within-mode standard deviations


@dataclass(frozen=True)
class ToyMetrics:
    """Averages over label groups; see the module docstring for each definition."""

    coverage: float
    weight_tv: float
    spread: float
    off_mode: float
    sliced_w2: float
    class_match: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def random_directions(dim: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n random unit vectors [n, dim] in float64 (normalised Gaussians)."""
    v = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced W2 between equally sized sample sets [N, ...] along unit `directions` [P, dim], float64.

    Per direction, W2^2 of two N-point empirical measures on a line is the mean squared difference of
    the sorted projections; the result is the square root of its mean over directions.
    """
    if a.shape[0] != b.shape[0] or a[0].numel() != b[0].numel():
        raise ValueError(f"sample sets must have equal count and size; got {tuple(a.shape)}, {tuple(b.shape)}")
    if directions.shape[1] != a[0].numel():
        raise ValueError(f"directions must be [P, {a[0].numel()}]; got {tuple(directions.shape)}")
    pa = (a.reshape(a.shape[0], -1).double() @ directions.T).sort(dim=0).values
    pb = (b.reshape(b.shape[0], -1).double() @ directions.T).sort(dim=0).values
    return (pa - pb).square().mean().sqrt().item()


def mode_counts(mixture: gmm.GaussianMixture, samples: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Assignment counts per component [classes * K] (float64)."""
    comp = gmm.assign_modes(mixture, samples, labels)
    return torch.bincount(comp, minlength=mixture.num_classes * mixture.modes_per_class).double()


def expected_counts(mixture: gmm.GaussianMixture, labels: torch.Tensor) -> torch.Tensor:
    """Expected counts per component [classes * K] for exact samples of `labels` (float64)."""
    return gmm.component_log_prior(mixture, labels).exp().sum(0)


def _group_stats(mixture, samples, labels, min_share: float) -> tuple[float, float, float, float]:
    """(coverage, weight_tv, spread, off_mode) of one label group (all entries of labels equal)."""
    prior = gmm.component_log_prior(mixture, labels[:1]).exp()[0]  # [M], zero outside the group
    owned = prior > 0
    comp = gmm.assign_modes(mixture, samples, labels)
    counts = torch.bincount(comp, minlength=prior.numel()).double()
    n = labels.shape[0]
    expected = n * prior
    covered = counts >= torch.clamp(min_share * expected, min=1.0)
    coverage = covered[owned].double().mean().item()
    weight_tv = 0.5 * (counts / n - prior)[owned].abs().sum().item()
    all_mu = mixture.means.reshape(-1, mixture.dim)
    s = mixture.stds.reshape(-1)[comp]
    offset = samples.reshape(n, -1).double() - all_mu[comp]  # x - mu_a
    ratio = offset.square().sum(-1) / (mixture.dim * s**2)
    # displacement towards every other mode b of the group, in units of s_a
    toward = all_mu[owned][None] - all_mu[comp][:, None]  # [n, M_group, dim], zero row for b = a
    unit = toward / toward.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    displacement = torch.einsum("nd,nmd->nm", offset, unit).amax(-1) / s
    off_mode = (displacement > OFF_MODE_SIGMAS).double().mean().item()
    return coverage, weight_tv, ratio.mean().item(), off_mode


def toy_metrics(
    mixture: gmm.GaussianMixture,
    samples: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    min_share: float = 0.1,
    num_directions: int = 256,
) -> ToyMetrics:
    """Coverage, mode-weight TV, spread, off-mode share, sliced W2, class match of samples [N, C, T, H, W].

    `generator` draws the exact reference set (same labels) and the projection directions. Non-finite
    samples raise ValueError (a sampler that produced NaN needs fixing, not averaging).
    """
    if samples.shape[0] != labels.shape[0]:
        raise ValueError(f"samples ({samples.shape[0]}) and labels ({labels.shape[0]}) differ in count")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain non-finite values")
    samples = samples.double()
    reference = gmm.sample_mixture(mixture, labels, generator)
    directions = random_directions(mixture.dim, num_directions, generator)
    stats, sw = [], []
    for label in labels.unique().tolist():
        idx = (labels == label).nonzero().flatten()
        stats.append(_group_stats(mixture, samples[idx], labels[idx], min_share))
        sw.append(sliced_wasserstein(samples[idx], reference[idx], directions))
    nearest = gmm.assign_modes(mixture, samples, torch.full_like(labels, gmm.UNCOND))
    owner = torch.div(nearest, mixture.modes_per_class, rounding_mode="floor")
    matched = (owner == labels) | (labels == gmm.UNCOND)
    cov, tv, spread, off_mode = (sum(column) / len(column) for column in zip(*stats, strict=True))
    return ToyMetrics(
        coverage=cov,
        weight_tv=tv,
        spread=spread,
        off_mode=off_mode,
        sliced_w2=sum(sw) / len(sw),
        class_match=matched.double().mean().item(),
    )
