"""PNG figure of toy sample sets: 2-D projections and per-mode assignment histograms.

SPEC-rcm §6 (samplers) on the toy teacher of `rcmfn.toy.gmm`. One column per sample set (truth,
teacher, student, ...), three rows:
  1. all samples on the two principal directions of the mode means (PCA of all means), coloured by
     label, mode means marked: where the classes are;
  2. each sample on the plane of its own class's mode means (per-class PCA, exact for K = 3; UNCOND
     samples use the class of their assigned mode), classes side by side: collapse, blur and dropped
     modes, which row 1 cannot resolve because classes are further apart than modes;
  3. the share of samples assigned to each mode (`gmm.assign_modes`) as bars, the exact share as dots.
Drawn on matplotlib's Agg canvas directly: no pyplot, no global backend switch.
"""

from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rcmfn.toy import gmm
from rcmfn.toy.metrics import expected_counts, mode_counts

UNCOND_COLOR = "0.55"


def principal_directions(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre [dim], top-2 principal axes [2, dim]) of points [N, dim]; zero axes beyond the rank."""
    centre = points.mean(0)
    _, _, vh = torch.linalg.svd(points - centre, full_matrices=False)
    axes = torch.zeros(2, points.shape[1], dtype=points.dtype)
    axes[: min(2, vh.shape[0])] = vh[:2]
    return centre, axes


def class_plane_coordinates(mixture: gmm.GaussianMixture, flat: torch.Tensor, classes: torch.Tensor):
    """2-D coordinates of points [N, dim] (and of all means) on their class's mode-mean plane.

    Class c is shifted right by c times the widest class extent plus a gap, so classes sit side by side.
    Returns (points [N, 2], means [classes * K, 2]).
    """
    planes = [principal_directions(mixture.means[c]) for c in range(mixture.num_classes)]
    means = torch.stack([(mixture.means[c] - o) @ a.T for c, (o, a) in enumerate(planes)])
    extent = (means.amax(1) - means.amin(1)).amax(0)  # [2]
    s_max = mixture.stds.max().item() * 4.0
    step = extent[0].item() + 2.0 * s_max + 1e-6
    shift = torch.tensor([[step * c, 0.0] for c in range(mixture.num_classes)], dtype=torch.float64)
    points = torch.zeros(flat.shape[0], 2, dtype=torch.float64)
    for c, (origin, axes) in enumerate(planes):
        rows = classes == c
        points[rows] = (flat[rows] - origin) @ axes.T + shift[c]
    return points, (means + shift[:, None]).reshape(-1, 2)


def _label_colors(labels: torch.Tensor) -> list:
    cmap = colormaps["tab10"]
    return [UNCOND_COLOR if label == gmm.UNCOND else cmap(label % 10) for label in labels.tolist()]


def _limits(points: torch.Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi = points.amin(0), points.amax(0)
    pad = 0.05 * (hi - lo) + 1e-6
    (x_lo, y_lo), (x_hi, y_hi) = (lo - pad).tolist(), (hi + pad).tolist()
    return (x_lo, x_hi), (y_lo, y_hi)


def _scatter(ax, points, colors, means, limits, title: str, xlabel: str) -> None:
    ax.scatter(means[:, 0].numpy(), means[:, 1].numpy(), marker="x", c="k", s=30, linewidths=1, zorder=2)
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=3, c=colors, zorder=3)  # collapse stays visible
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)


def save_toy_figure(
    path: str | Path,
    sets: dict[str, torch.Tensor],
    mixture: gmm.GaussianMixture,
    labels: torch.Tensor,
    dpi: int = 90,
) -> Path:
    """Write the figure for `sets` {name: samples [N, C, T, H, W]} drawn for `labels` [N]; returns path.

    Non-finite samples are left out of every panel and counted in the column title.
    """
    if not sets:
        raise ValueError("sets must contain at least one sample set")
    for name, x in sets.items():
        if x.shape[0] != labels.shape[0] or tuple(x.shape[1:]) != mixture.shape:
            raise ValueError(f"set {name!r} has shape {tuple(x.shape)}; expected [{labels.shape[0]}, *{mixture.shape}]")
    all_means = mixture.means.reshape(-1, mixture.dim)
    centre, axes = principal_directions(all_means)
    global_means = (all_means - centre) @ axes.T
    expected = expected_counts(mixture, labels) / labels.shape[0]
    k = mixture.modes_per_class
    mode_colors = [colormaps["tab10"](c % 10) for c in range(mixture.num_classes) for _ in range(k)]
    colors = _label_colors(labels)

    columns = []  # per set: (finite mask, global coords, class-plane coords, plane means)
    for x in sets.values():
        flat = x.reshape(x.shape[0], -1).double()
        ok = torch.isfinite(flat).all(-1)
        classes = torch.div(
            gmm.assign_modes(mixture, flat[ok].reshape(-1, *mixture.shape), labels[ok]),
            k,
            rounding_mode="floor",
        )
        plane, plane_means = class_plane_coordinates(mixture, flat[ok], classes)
        columns.append((ok, (flat[ok] - centre) @ axes.T, plane, plane_means))
    global_limits = _limits(torch.cat([c[1] for c in columns] + [global_means]))
    plane_limits = _limits(torch.cat([c[2] for c in columns] + [columns[0][3]]))

    fig = Figure(figsize=(3.4 * len(sets), 9.0), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(3, len(sets), squeeze=False)
    for col, (name, (ok, global_xy, plane_xy, plane_means)) in enumerate(zip(sets, columns, strict=True)):
        keep = [c for c, good in zip(colors, ok.tolist(), strict=True) if good]
        dropped = int((~ok).sum())
        title = name if not dropped else f"{name} ({dropped} non-finite left out)"
        _scatter(grid[0, col], global_xy, keep, global_means, global_limits, title, "PCs of all mode means")
        _scatter(
            grid[1, col],
            plane_xy,
            keep,
            plane_means,
            plane_limits,
            "per-class mode planes",
            "classes side by side",
        )
        share = mode_counts(mixture, sets[name][ok], labels[ok]) / max(int(ok.sum()), 1)
        index = range(share.numel())
        grid[2, col].bar(index, share.numpy(), color=mode_colors)
        grid[2, col].scatter(index, expected.numpy(), marker="o", c="k", s=12, zorder=3)
        grid[2, col].set_xlabel("mode (class * K + k)", fontsize=8)
        grid[2, col].set_ylabel("share of samples (dots: exact)", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
