"""Tests for rcmfn/toy/digits.py: the split, the latent scaling, the flow-matching teacher, the classifier,
the sample metrics and the figure's mosaic, on the real bundled digits where it matters."""

import math

import pytest
import torch

from rcmfn.toy import digits
from rcmfn.toy.tiny_dit import TinyDiT, TinyDiTConfig, init_params, velocity_net
from rcmfn.toy.warm_start import WarmStartConfig

SPLIT = digits.load_digits_split()


def indexed_pixels(n: int) -> torch.Tensor:
    """n distinct 'images' whose first pixel is the row index (so a latent tells which row it came from)."""
    pixels = torch.zeros(n, 64, dtype=torch.float64)
    pixels[:, 0] = torch.arange(n) % 17
    pixels[:, 1] = torch.arange(n) // 17
    return pixels


def row_index(latents: torch.Tensor) -> torch.Tensor:
    pixels = digits.to_pixels(latents).reshape(-1, 64).round().long()
    return pixels[:, 0] + 17 * pixels[:, 1]


def test_split_is_stratified_disjoint_and_a_function_of_its_seed():
    labels = torch.arange(203) % 7
    a = digits.split_digits(indexed_pixels(203), labels, 0.3, seed=4)
    again = digits.split_digits(indexed_pixels(203), labels, 0.3, seed=4)
    other = digits.split_digits(indexed_pixels(203), labels, 0.3, seed=5)
    train, held = row_index(a.train_x), row_index(a.held_x)
    assert sorted(torch.cat([train, held]).tolist()) == list(range(203))  # disjoint and complete
    assert torch.equal(labels[train], a.train_y) and torch.equal(labels[held], a.held_y)
    for c in range(7):
        assert int((a.held_y == c).sum()) == round(0.3 * int((labels == c).sum()))
    assert torch.equal(held, row_index(again.held_x))
    assert not torch.equal(held, row_index(other.held_x))
    with pytest.raises(ValueError, match="held_out_fraction"):
        digits.split_digits(indexed_pixels(10), labels[:10], 1.0, 0)


def test_bundled_digits_split_into_latents_in_minus_one_one():
    assert SPLIT.train_x.shape[1:] == digits.SHAPE and SPLIT.train_x.dtype == torch.float64
    assert SPLIT.train_y.shape[0] + SPLIT.held_y.shape[0] == 1797
    assert torch.bincount(SPLIT.held_y).tolist() == [
        round(0.3 * n) for n in torch.bincount(torch.cat([SPLIT.train_y, SPLIT.held_y])).tolist()
    ]
    both = torch.cat([SPLIT.train_x, SPLIT.held_x])
    assert both.min() == -1.0 and both.max() == 1.0
    pixels = digits.to_pixels(both)
    assert torch.equal(pixels, pixels.round())  # the integer pixels survive the round trip exactly


def test_class_embeddings_look_up_the_null_row_for_uncond_and_refuse_other_labels():
    table = digits.class_table(tokens=3, dim=5)
    got = digits.class_embeddings(table, torch.tensor([digits.UNCOND, 0, 9]))
    assert torch.equal(got, table[[0, 1, 10]])
    assert (table[:, None] - table[None]).flatten(2).norm(dim=-1).add(torch.eye(11)).min() > 0.5
    with pytest.raises(ValueError, match="labels must lie"):
        digits.class_embeddings(table, torch.tensor([10]))


def test_flow_matching_points_lie_between_a_training_digit_and_its_noise():
    """x_r - r (eps - x0) = x0 must be a training digit, and x_r + (1 - r)(eps - x0) = eps (float64)."""
    table = digits.class_table()
    cfg = WarmStartConfig(batch_size=64, null_fraction=0.25)
    x_r, c_noise, cond, target = digits.flow_matching_batch(
        SPLIT, table, cfg, torch.Generator().manual_seed(0), torch.float64
    )
    r = (c_noise / 1000.0).reshape(-1, 1, 1, 1, 1)
    x0 = (x_r - r * target).reshape(64, 64)
    dist = torch.cdist(x0, SPLIT.train_x.reshape(-1, 64))
    assert dist.min(1).values.max() < 1e-12
    null = (cond == table[0]).flatten(1).all(1)
    assert 0 < int(null.sum()) < 40  # about a quarter unconditional
    nearest = dist.argmin(1)
    assert torch.equal(cond[~null], digits.class_embeddings(table, SPLIT.train_y[nearest[~null]]))


def test_a_tiny_teacher_fit_reduces_its_flow_matching_loss():
    module = TinyDiT(TinyDiTConfig(channels=1, width=32, depth=1, heads=2, mlp_ratio=2, freq_dim=16))
    net, table = velocity_net(module), digits.class_table()
    params = init_params(module, torch.Generator().manual_seed(0))
    cfg = WarmStartConfig(steps=150, batch_size=32, lr=4e-3, warmup_steps=10)
    fitted, losses = digits.train_teacher(net, params, SPLIT, table, torch.Generator().manual_seed(1), cfg)
    before = digits.flow_matching_loss(net, params, SPLIT, table, torch.Generator().manual_seed(2), cfg)
    after = digits.flow_matching_loss(net, fitted, SPLIT, table, torch.Generator().manual_seed(2), cfg)
    assert len(losses) == 150 and after < 0.7 * before


@pytest.fixture(scope="module")
def classifier():
    """A quicker judge than the study's (100 steps at lr 1e-2: held-out accuracy 0.985 vs 0.991 at 400 / 3e-3)."""
    return digits.train_classifier(SPLIT.train_x, SPLIT.train_y, digits.ClassifierConfig(steps=100, lr=1e-2))


def test_classifier_recognises_held_out_digits(classifier):
    accuracy = (classifier(SPLIT.held_x).argmax(-1) == SPLIT.held_y).double().mean().item()
    assert accuracy > 0.95


def test_classifier_training_is_a_function_of_its_seed():
    train = (
        lambda seed: digits.train_classifier(  # noqa: E731
            SPLIT.train_x, SPLIT.train_y, digits.ClassifierConfig(steps=5, seed=seed)
        ).features(SPLIT.held_x[:5])
    )
    assert torch.equal(train(0), train(0)) and not torch.equal(train(0), train(1))


def test_digit_metrics_of_the_reference_itself_and_of_shuffled_labels(classifier):
    """The held-out digits against themselves: FD 0, precision = recall = 1, accuracy the classifier's.
    The same images under permuted labels: only the accuracy falls (to about chance)."""
    m = digits.digit_metrics(classifier, SPLIT.held_x, SPLIT.held_y, SPLIT.held_x)
    # FD of a set with itself is 0 up to the square roots of round-off eigenvalues of a rank-deficient
    # covariance (sqrt(1e-16) = 1e-8 each, summed over the features): 4.9e-7 seen on one BLAS; a blurred set is > 10.
    assert abs(m["fd"]) < 1e-5 and m["precision"] == 1.0 and m["recall"] == 1.0 and m["accuracy"] > 0.95
    shuffled = SPLIT.held_y[torch.randperm(SPLIT.held_y.shape[0], generator=torch.Generator().manual_seed(0))]
    s = digits.digit_metrics(classifier, SPLIT.held_x, shuffled, SPLIT.held_x)
    assert s["accuracy"] < 0.2 and s["fd"] == m["fd"] and s["recall"] == 1.0
    blur = digits.digit_metrics(
        classifier, SPLIT.held_x.mean(0, keepdim=True).expand_as(SPLIT.held_x), SPLIT.held_y, SPLIT.held_x
    )
    assert blur["recall"] < 0.01 and blur["fd"] > 10.0
    with pytest.raises(ValueError, match="non-finite"):
        digits.digit_metrics(classifier, SPLIT.held_x * math.nan, SPLIT.held_y, SPLIT.held_x)


def test_sample_grid_puts_each_class_first_samples_in_its_cells():
    labels = torch.tensor([3, 0, 3, 9, 3])
    x = torch.stack([torch.full(digits.SHAPE, v, dtype=torch.float64) for v in (-0.5, 0.0, 0.25, 0.5, 0.75)])
    grid = digits.sample_grid({"a": x, "b": -x}, labels, per_class=2)
    assert grid.shape == (17, 10 * 2 * 9 + 9 * 2)
    col = lambda c, j: (c * 2 + j) * 9 + c * 2  # noqa: E731
    assert grid[0:8, col(3, 0) : col(3, 0) + 8].eq(4.0).all()  # (-0.5 + 1) * 8
    assert grid[0:8, col(3, 1) : col(3, 1) + 8].eq(10.0).all()  # the second 3; the third is left out
    assert grid[9:17, col(9, 0) : col(9, 0) + 8].eq(4.0).all()  # row b: -0.5
    assert grid[0:8, col(5, 0)].isnan().all() and grid[8].isnan().all()
