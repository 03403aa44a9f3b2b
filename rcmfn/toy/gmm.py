"""Analytic toy teacher: a class-conditional Gaussian mixture with a closed-form velocity field.

SPEC-rcm §1.1-§1.2: the teacher is a rectified-flow velocity net v(x_r, 1000 r) with x_r = (1-r) x0 + r eps.
For a mixture the exact v = E[eps - x0 | x_r, c] is known, so the CPU toy needs no pretrained model.

Layout. Latents are [B, C, T, H, W] (default 4 x 1 x 8 x 8 = 256 dims), flattened to `dim` here.
Class c has K modes mu_{c,k} with isotropic std s_{c,k} and weight w_{c,k}; mode k of class c is the
*component* c * K + k (one global index, `divmod(component, K)` gives (class, mode)). Each class has a
fixed "text embedding" [L, D]; the unconditional branch (label `UNCOND` = -1) is the mixture over all
classes with a uniform class prior and is selected by its own fixed random sequence `null_text`, not by
zeros, so every condition is a plain lookup in one table and no value is special.

Posterior (per component, derived): x_r | k ~ N((1-r) mu_k, den_k I) with den_k = (1-r)^2 s_k^2 + r^2,
E[x0 | x_r, k] = mu_k + (1-r) s_k^2 / den_k (x_r - (1-r) mu_k), and
v_k = (x_r - E[x0 | x_r, k]) / r = (x_r - (1-r) mu_k)(r - (1-r) s_k^2) / den_k - mu_k, finite on [0, 1].
Everything is float64.
"""

import math
from dataclasses import dataclass

import torch

from rcmfn.precond import TIME_SCALE

UNCOND = -1  # label of the unconditional (null-embedding) branch


@dataclass(frozen=True)
class MixtureConfig:
    """Shape and geometry of the toy mixture; every tensor is drawn from `seed`."""

    channels: int = 4
    """latent channels C"""
    frames: int = 1
    """latent frames T"""
    height: int = 8
    """latent height H"""
    width: int = 8
    """latent width W"""
    num_classes: int = 4
    """number of classes (text prompts)"""
    modes_per_class: int = 3
    """K, Gaussian modes per class"""
    class_norm: float = 12.0
    """norm of each class centroid (random direction)"""
    mode_offset: float = 8.0
    """norm of each mode's offset from its class centroid (random direction); sets the mode separation"""
    std_range: tuple[float, float] = (0.2, 0.4)
    """per-mode isotropic std s_k, drawn uniformly in this range"""
    weight_ratio: float = 2.0
    """unnormalised mode weights are drawn uniformly in [1, weight_ratio] (1 = equal weights)"""
    text_tokens: int = 8
    """L, tokens of each class embedding"""
    text_dim: int = 32
    """D, width of each embedding token"""
    seed: int = 0
    """seed of the generator that draws means, stds, weights and embeddings"""

    def __post_init__(self):
        for name in ("channels", "frames", "height", "width", "num_classes", "modes_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"MixtureConfig.{name} must be >= 1; got {getattr(self, name)}")
        for name in ("text_tokens", "text_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MixtureConfig.{name} must be >= 1; got {getattr(self, name)}")
        lo, hi = self.std_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"MixtureConfig.std_range must satisfy 0 < lo <= hi; got {self.std_range}")
        if self.weight_ratio < 1.0:
            raise ValueError(f"MixtureConfig.weight_ratio must be >= 1; got {self.weight_ratio}")


@dataclass(frozen=True)
class GaussianMixture:
    """The mixture tensors, all float64. It is also the teacher's `params` (see `velocity`)."""

    means: torch.Tensor  # [classes, K, dim]
    log_weights: torch.Tensor  # [classes, K], logsumexp over K is 0
    stds: torch.Tensor  # [classes, K]
    text: torch.Tensor  # [classes, L, D]
    null_text: torch.Tensor  # [L, D]
    shape: tuple[int, int, int, int]  # (C, T, H, W) of one sample

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def modes_per_class(self) -> int:
        return self.means.shape[1]

    @property
    def dim(self) -> int:
        return self.means.shape[2]


def _random_directions(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """n unit vectors in R^dim, float64."""
    v = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def build_mixture(cfg: MixtureConfig = MixtureConfig()) -> GaussianMixture:
    """Draw the mixture of `cfg` deterministically from cfg.seed (CPU, float64)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n, k = cfg.num_classes, cfg.modes_per_class
    dim = cfg.channels * cfg.frames * cfg.height * cfg.width
    centroids = cfg.class_norm * _random_directions(n, dim, g)
    offsets = cfg.mode_offset * _random_directions(n * k, dim, g).reshape(n, k, dim)
    lo, hi = cfg.std_range
    stds = lo + (hi - lo) * torch.rand(n, k, generator=g, dtype=torch.float64)
    raw = 1.0 + (cfg.weight_ratio - 1.0) * torch.rand(n, k, generator=g, dtype=torch.float64)
    log_weights = torch.log(raw / raw.sum(-1, keepdim=True))
    text = torch.randn(n + 1, cfg.text_tokens, cfg.text_dim, generator=g, dtype=torch.float64)
    return GaussianMixture(
        means=centroids[:, None, :] + offsets,
        log_weights=log_weights,
        stds=stds,
        text=text[:n],
        null_text=text[n],
        shape=(cfg.channels, cfg.frames, cfg.height, cfg.width),
    )


def _check_labels(mixture: GaussianMixture, labels: torch.Tensor) -> None:
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape [B]; got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < UNCOND or labels.max() >= mixture.num_classes):
        raise ValueError(
            f"labels must lie in [{UNCOND}, {mixture.num_classes - 1}] ({UNCOND} = unconditional); "
            f"got values in [{labels.min().item()}, {labels.max().item()}]"
        )


def component_log_prior(mixture: GaussianMixture, labels: torch.Tensor) -> torch.Tensor:
    """log p(component | label), [B, classes * K] float64; -inf outside the label's class."""
    _check_labels(mixture, labels)
    return _log_prior(mixture, labels)


def _log_prior(mixture: GaussianMixture, labels: torch.Tensor) -> torch.Tensor:
    n, k = mixture.num_classes, mixture.modes_per_class
    flat = mixture.log_weights.reshape(1, n * k).to(labels.device)
    uncond = flat - math.log(n)
    owner = torch.arange(n * k, device=labels.device) // k
    cond = torch.where(owner[None, :] == labels[:, None], flat, -math.inf)
    return torch.where((labels == UNCOND)[:, None], uncond, cond)


def class_embeddings(mixture: GaussianMixture, labels: torch.Tensor) -> torch.Tensor:
    """Text embeddings [B, L, D] (float64) for labels in {UNCOND, 0, ..., classes-1}."""
    _check_labels(mixture, labels)
    table = torch.cat([mixture.null_text[None], mixture.text]).to(labels.device)
    return table[labels + 1]


def labels_from_cond(mixture: GaussianMixture, cond: torch.Tensor) -> torch.Tensor:
    """Recover labels [B] by matching each cond [B, L, D] to the embedding table (UNCOND for null).

    A row matches when every entry agrees within rtol 1e-2 / atol 1e-3, loose enough for a bfloat16
    round trip; table rows differ by O(1), so at most one matches. ValueError if none does.
    """
    table = torch.cat([mixture.null_text[None], mixture.text]).to(cond.device)
    if cond.dim() != 3 or cond.shape[1:] != table.shape[1:]:
        raise ValueError(f"condition must have shape [B, {table.shape[1]}, {table.shape[2]}]; got {tuple(cond.shape)}")
    close = (cond.double()[:, None] - table[None]).abs() <= 1e-3 + 1e-2 * table[None].abs()
    match = close.flatten(2).all(-1)  # [B, classes + 1]
    if not bool(match.any(-1).all()):
        bad = (~match.any(-1)).nonzero().flatten()[:8].tolist()
        raise ValueError(f"condition rows {bad} match no class embedding nor the null embedding")
    return match.double().argmax(-1) - 1


def nearest_labels(mixture: GaussianMixture, cond: torch.Tensor) -> torch.Tensor:
    """Labels [B] of the table rows nearest (in L2) to cond [B, L, D]; no validation, compile-safe."""
    table = torch.cat([mixture.null_text[None], mixture.text]).to(cond.device)
    return (cond.double()[:, None] - table[None]).square().flatten(2).sum(-1).argmin(-1) - 1


def _per_component(mixture: GaussianMixture, x_r: torch.Tensor, r: torch.Tensor, labels: torch.Tensor):
    """Responsibilities p(k | x_r, label) and den_k = (1-r)^2 s_k^2 + r^2, both [B, classes * K]."""
    mu = mixture.means.reshape(-1, mixture.dim).to(x_r.device)  # [M, dim]
    s2 = mixture.stds.reshape(1, -1).to(x_r.device) ** 2
    a = (1.0 - r)[:, None]
    den = a**2 * s2 + (r**2)[:, None]
    sq = (x_r**2).sum(-1, keepdim=True) - 2.0 * a * (x_r @ mu.T) + a**2 * (mu**2).sum(-1)[None]
    log_lik = -0.5 * sq / den - 0.5 * mixture.dim * torch.log(den)
    resp = torch.softmax(_log_prior(mixture, labels).to(x_r.device) + log_lik, dim=-1)
    return resp, den, a, s2, mu


def _flat_inputs(mixture: GaussianMixture, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if tuple(x.shape[1:]) != mixture.shape:
        raise ValueError(f"x must have shape [B, *{mixture.shape}]; got {tuple(x.shape)}")
    if r.shape != (x.shape[0],):
        raise ValueError(f"r must have shape [B] = [{x.shape[0]}]; got {tuple(r.shape)}")
    return x.double().reshape(x.shape[0], -1), r.double()


def posterior_mean(mixture: GaussianMixture, x_r: torch.Tensor, r: torch.Tensor, labels: torch.Tensor):
    """E[x0 | x_r, label], float64, shaped like x_r. Module docstring has the formula (derived)."""
    _check_labels(mixture, labels)
    x, r = _flat_inputs(mixture, x_r, r)
    resp, den, a, s2, mu = _per_component(mixture, x, r, labels)
    gain = resp * a * s2 / den  # weight of (x_r - (1-r) mu_k) in the mixture of E[x0 | x_r, k]
    x0 = gain.sum(-1, keepdim=True) * x + (resp - gain * a) @ mu
    return x0.reshape(x_r.shape)


def posterior_velocity(mixture: GaussianMixture, x_r: torch.Tensor, r: torch.Tensor, labels: torch.Tensor):
    """v = E[eps - x0 | x_r, label] without dividing by r, float64, shaped like x_r. SPEC-rcm §1.2."""
    _check_labels(mixture, labels)
    return _velocity(mixture, x_r, r, labels)


def _velocity(mixture: GaussianMixture, x_r: torch.Tensor, r: torch.Tensor, labels: torch.Tensor):
    x, r = _flat_inputs(mixture, x_r, r)
    resp, den, a, s2, mu = _per_component(mixture, x, r, labels)
    slope = resp * (r[:, None] - a * s2) / den  # weight of (x_r - (1-r) mu_k) in v
    v = slope.sum(-1, keepdim=True) * x - (slope * a + resp) @ mu
    return v.reshape(x_r.shape)


def velocity(mixture: GaussianMixture, x_in: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor):
    """The teacher as a raw velocity net: `velocity(params=mixture, x_r, 1000 r, cond) -> v`. SPEC-rcm §1.2.

    Plugs into `rcmfn.precond.trigflow_denoiser(velocity)` with the mixture as params. The class of each
    sample comes from `labels_from_cond`; the math is float64 and v is returned in x_in's dtype (pass
    time_dtype=torch.float64 to the wrapper for an exact float64 teacher). The embedding check is data
    dependent, so this does not compile with fullgraph=True; `velocity_unchecked` does.
    """
    labels = labels_from_cond(mixture, cond)
    return _velocity(mixture, x_in, c_noise.double() / TIME_SCALE, labels).to(x_in.dtype)


def velocity_unchecked(mixture: GaussianMixture, x_in: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor):
    """`velocity` for torch.compile(fullgraph=True): each cond is taken as its nearest table row, unchecked.

    Equal to `velocity` on valid embeddings; an embedding that matches no class silently gets the nearest
    class, so validate the labels once outside the compiled region (e.g. with `labels_from_cond`).
    """
    labels = nearest_labels(mixture, cond)
    return _velocity(mixture, x_in, c_noise.double() / TIME_SCALE, labels).to(x_in.dtype)


def sample_mixture(mixture: GaussianMixture, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exact samples x0 [B, C, T, H, W] (float64) for each label (UNCOND draws the class too)."""
    probs = component_log_prior(mixture, labels).exp()
    comp = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    noise = torch.randn(labels.shape[0], mixture.dim, generator=generator, dtype=torch.float64, device=labels.device)
    mu = mixture.means.reshape(-1, mixture.dim).to(labels.device)[comp]
    x0 = mu + mixture.stds.reshape(-1).to(labels.device)[comp, None] * noise
    return x0.reshape(labels.shape[0], *mixture.shape)


def assign_modes(mixture: GaussianMixture, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Component index [B] (class * K + mode) of highest posterior responsibility at r = 0.

    Restricted to the label's class; an UNCOND sample may land in any class.
    """
    _check_labels(mixture, labels)
    x, r = _flat_inputs(mixture, x0, torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device))
    resp = _per_component(mixture, x, r, labels)[0]
    return resp.argmax(-1)
