"""Tests for rcmfn/toy/figure.py: the figure is written as a PNG and bad inputs are named."""

import math

import pytest
import torch

from rcmfn.toy import figure as toy_figure
from rcmfn.toy import gmm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_figure_is_written_as_png(tmp_path):
    mixture = gmm.build_mixture()
    labels = torch.cat([torch.arange(4).repeat(30), torch.full((7,), gmm.UNCOND)])
    truth = gmm.sample_mixture(mixture, labels, torch.Generator().manual_seed(0))
    blurred = truth + 0.5 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    broken = truth.float().clone()
    broken[5] = math.nan  # a sampler's NaN sample is dropped from the plot, not fatal
    out = toy_figure.save_toy_figure(
        tmp_path / "toy.png", {"truth": truth, "blurred": blurred, "broken": broken}, mixture, labels
    )
    assert out.exists() and out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000


def test_principal_directions_span_three_mode_means():
    mixture = gmm.build_mixture(gmm.MixtureConfig(num_classes=1, modes_per_class=3, height=2, width=2))
    centre, axes = toy_figure.principal_directions(mixture.means[0])
    mu = mixture.means[0] - centre
    torch.testing.assert_close(axes @ axes.T, torch.eye(2, dtype=torch.float64))
    # three points lie in a plane through their centroid: the projection loses nothing
    torch.testing.assert_close((mu @ axes.T) @ axes, mu)


def test_class_planes_keep_mode_distances_and_put_classes_apart():
    mixture = gmm.build_mixture()
    means = mixture.means.reshape(12, -1)
    points, plane_means = toy_figure.class_plane_coordinates(mixture, means, torch.arange(12) // 3)
    torch.testing.assert_close(points, plane_means)
    for c in range(4):
        torch.testing.assert_close(
            torch.cdist(points[3 * c : 3 * c + 3], points[3 * c : 3 * c + 3]),
            torch.cdist(means[3 * c : 3 * c + 3], means[3 * c : 3 * c + 3]),
        )
    assert (points[3:, 0].reshape(3, 3).amin(1) > points[:9, 0].reshape(3, 3).amax(1)).all()


def test_bad_sets_raise(tmp_path):
    mixture = gmm.build_mixture()
    labels = torch.arange(4)
    with pytest.raises(ValueError, match="at least one"):
        toy_figure.save_toy_figure(tmp_path / "a.png", {}, mixture, labels)
    with pytest.raises(ValueError, match="set 'x' has shape"):
        toy_figure.save_toy_figure(tmp_path / "a.png", {"x": torch.randn(3, 4, 1, 8, 8)}, mixture, labels)
