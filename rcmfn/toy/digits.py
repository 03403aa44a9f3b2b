"""Real data for a learned-teacher study: scikit-learn's bundled 8x8 digits, a flow-matching teacher on
them, and a classifier whose judgement of samples is compared with held-out real digits.

SPEC-rcm §1.1-§1.2 (the teacher is a rectified-flow velocity net v(x_r, 1000 r) with x_r = (1-r) x0 + r eps,
trained by flow matching on the plain target eps - x0, not an exact posterior as on the Gaussian-mixture
toy). Layout: an image of 8 x 8 pixels in [0, 16] is the latent [C, T, H, W] = [1, 1, 8, 8] with values
pixels / 8 - 1 in [-1, 1]; the tiny DiT patches it into 4 x 4 tokens of 2 x 2 pixels (channels=1). Each
class has a fixed random "text embedding" [L, D] and the unconditional branch its own row (label
`UNCOND` = -1), a table lookup as in rcmfn/toy/gmm.py.

Evaluation (rcmfn/toy/feature_metrics.py has the formulas): a small MLP classifier trained on the real
training split gives the class accuracy of class-conditional samples, and its penultimate layer the
features of the Frechet distance and of k-NN precision / recall against the held-out digits.

scikit-learn (the `dev` extra) is imported only inside `load_digits_split`; its digits ship inside the
package, so nothing is downloaded.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as nnf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensordict import TensorDict
from torch import nn
from tqdm.auto import tqdm

from rcmfn.precond import TIME_SCALE, VelocityNet
from rcmfn.time import sample_time
from rcmfn.toy.feature_metrics import frechet_distance, precision_recall
from rcmfn.toy.warm_start import WarmStartConfig, fit_velocity

UNCOND = -1  # label of the unconditional (null-embedding) branch
NUM_CLASSES = 10
SHAPE = (1, 1, 8, 8)  # (C, T, H, W) of one digit
PIXEL_MAX = 16.0  # the digits' pixels are integers in [0, 16]


def to_latent(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [N, 64] in [0, 16] -> latents [N, 1, 1, 8, 8] in [-1, 1], float64."""
    return (pixels.double() * (2.0 / PIXEL_MAX) - 1.0).reshape(-1, *SHAPE)


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Latents [N, 1, 1, 8, 8] -> pixels [N, 8, 8] in [0, 16] (clamped), float64."""
    return ((x.double().reshape(-1, 8, 8) + 1.0) * (PIXEL_MAX / 2.0)).clamp(0.0, PIXEL_MAX)


@dataclass(frozen=True)
class DigitsSplit:
    """Latents [N, 1, 1, 8, 8] float64 in [-1, 1] and labels [N] int64 of the two parts."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    held_x: torch.Tensor
    held_y: torch.Tensor


def split_digits(pixels: torch.Tensor, labels: torch.Tensor, held_out_fraction: float, seed: int) -> DigitsSplit:
    """Stratified split: per class, a permutation drawn from `seed`; its first round(fraction * n_c) are held out.

    Both parts keep the dataset's order (sorted indices), so the split depends on nothing but the seed.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1); got {held_out_fraction}")
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        held[idx[torch.randperm(idx.numel(), generator=gen)[: round(held_out_fraction * idx.numel())]]] = True
    x = to_latent(pixels)
    return DigitsSplit(x[~held], labels[~held].long(), x[held], labels[held].long())


def load_digits_split(held_out_fraction: float = 0.3, seed: int = 0) -> DigitsSplit:
    """scikit-learn's 1,797 bundled digits (no download), split by `split_digits`."""
    from sklearn.datasets import load_digits  # the digits study alone needs scikit-learn (`dev` extra)

    pixels, labels = load_digits(return_X_y=True)
    return split_digits(torch.from_numpy(pixels), torch.from_numpy(labels), held_out_fraction, seed)


def class_table(tokens: int = 8, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Fixed random embeddings [1 + classes, L, D] float64: row 0 the null (unconditional) one, row 1 + c class c."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1 + NUM_CLASSES, tokens, dim, generator=gen, dtype=torch.float64)


def class_embeddings(table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Embeddings [B, L, D] for labels in {UNCOND, 0, ..., 9}."""
    if labels.numel() and (labels.min() < UNCOND or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in [{UNCOND}, {NUM_CLASSES - 1}]; got {labels.min()}..{labels.max()}")
    return table[labels + 1]


def flow_matching_batch(
    split: DigitsSplit, table: torch.Tensor, cfg: WarmStartConfig, generator: torch.Generator, dtype: torch.dtype
):
    """(x_r, c_noise, cond, eps - x0) at cfg.batch_size training digits drawn with replacement. SPEC-rcm §1.1.

    A cfg.null_fraction share of the labels is replaced by UNCOND (the CFG branch); r ~ cfg.time_dist.
    Arithmetic in float64, cast to `dtype` at the end.
    """
    n = cfg.batch_size
    idx = torch.randint(0, split.train_y.shape[0], (n,), generator=generator)
    x0, labels = split.train_x[idx], split.train_y[idx]
    labels = torch.where(torch.rand(n, generator=generator) < cfg.null_fraction, UNCOND, labels)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    r = sample_time(cfg.time_dist, n, generator=generator, domain="rf").reshape(-1, 1, 1, 1, 1)
    x_r = (1.0 - r) * x0 + r * eps
    cond = class_embeddings(table, labels)
    return x_r.to(dtype), (TIME_SCALE * r.flatten()).to(dtype), cond.to(dtype), (eps - x0).to(dtype)


def train_teacher(
    net: VelocityNet,
    params: TensorDict,
    split: DigitsSplit,
    table: torch.Tensor,
    generator: torch.Generator,
    cfg: WarmStartConfig,
    progress: bool = False,
) -> tuple[TensorDict, list[float]]:
    """Flow matching on the training digits (warm_start.fit_velocity); returns (teacher params, losses)."""
    batch_fn = lambda gen, dtype: flow_matching_batch(split, table, cfg, gen, dtype)  # noqa: E731
    return fit_velocity(net, params, batch_fn, generator, cfg, progress, "teacher (flow matching)")


@torch.no_grad()
def flow_matching_loss(
    net: VelocityNet,
    params: TensorDict,
    split: DigitsSplit,
    table: torch.Tensor,
    generator: torch.Generator,
    cfg: WarmStartConfig,
    batches: int = 8,
) -> float:
    """Mean flow-matching loss over `batches` fresh batches (float64 sums): a lower-variance fit measure."""
    dtype = params["patch_embed.weight"].dtype
    total = 0.0
    for _ in range(batches):
        x_r, c_noise, cond, target = flow_matching_batch(split, table, cfg, generator, dtype)
        total += (net(params, x_r, c_noise, cond).double() - target.double()).square().mean().item()
    return total / batches


class DigitClassifier(nn.Module):
    """MLP on the 64 pixels in [-1, 1]: 64 -> hidden -> features -> 10 (GELU); `features` is the
    penultimate layer, the space of the Frechet distance and of k-NN precision / recall."""

    def __init__(self, hidden: int = 128, features: int = 32):
        super().__init__()
        self.inp = nn.Linear(64, hidden)
        self.mid = nn.Linear(hidden, features)
        self.out = nn.Linear(features, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 64).to(self.inp.weight.dtype).clamp(-1.0, 1.0)  # samples: clipped like images
        return nnf.gelu(self.mid(nnf.gelu(self.inp(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@dataclass(frozen=True)
class ClassifierConfig:
    """The evaluator: a small MLP trained on the real training split (full batch, AdamW)."""

    hidden: int = 128
    """width of the first hidden layer"""
    features: int = 32
    """width of the penultimate layer (the feature space of FD and precision / recall)"""
    steps: int = 400
    """full-batch AdamW steps"""
    lr: float = 3e-3
    """AdamW learning rate"""
    weight_decay: float = 1e-3
    """AdamW weight decay"""
    input_noise: float = 0.1
    """std of Gaussian noise added to the inputs while training (smoother features)"""
    seed: int = 0
    """seed of the initialisation and the input noise (fixed: the judge is the same for every run)"""

    def __post_init__(self):
        if min(self.hidden, self.features, self.steps) < 1 or self.lr <= 0 or self.input_noise < 0:
            raise ValueError(f"ClassifierConfig needs sizes and steps >= 1, lr > 0, input_noise >= 0; got {self}")


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, cfg: ClassifierConfig = ClassifierConfig(), progress: bool = False
) -> DigitClassifier:
    """Train a DigitClassifier (float64) on latents x [N, 1, 1, 8, 8] and labels y [N]; returns it in eval mode.

    Weights ~ N(0, 1/fan_in), biases 0, drawn from cfg.seed like every other draw here.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    model = DigitClassifier(cfg.hidden, cfg.features).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else torch.randn(p.shape, generator=gen).double())
            if not name.endswith("bias"):
                p.div_(math.sqrt(p.shape[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    flat = x.double().reshape(x.shape[0], 64)
    for _ in tqdm(range(cfg.steps), disable=not progress, desc="classifier"):
        noisy = flat + cfg.input_noise * torch.randn(flat.shape, generator=gen, dtype=torch.float64)
        loss = nnf.cross_entropy(model(noisy), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def sample_grid(sets: dict[str, torch.Tensor], labels: torch.Tensor, per_class: int = 4) -> torch.Tensor:
    """Pixel mosaic float64 in [0, 16], NaN (blank) in the gaps: one band of 8 pixel rows per set, and in it
    the first `per_class` samples of each class 0..9 side by side, classes left to right (1-pixel gaps
    between digits, 3 between classes).

    Each set holds samples [N, 1, 1, 8, 8] of `labels` [N]; a class with fewer samples leaves its cells blank.
    """
    cell, gap = 9, 1
    width = NUM_CLASSES * per_class * cell + (NUM_CLASSES - 1) * 2 * gap
    grid = torch.full((len(sets) * cell - gap, width), float("nan"), dtype=torch.float64)
    for row, x in enumerate(sets.values()):
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"every set needs one sample per label ({labels.shape[0]}); got {x.shape[0]}")
        pixels = to_pixels(x)
        for c in range(NUM_CLASSES):
            for j, i in enumerate((labels == c).nonzero().flatten()[:per_class].tolist()):
                col = (c * per_class + j) * cell + c * 2 * gap
                grid[row * cell : row * cell + 8, col : col + 8] = pixels[i]
    return grid


def save_sample_grid(path, sets: dict[str, torch.Tensor], labels: torch.Tensor, per_class: int = 4, dpi: int = 110):
    """PNG of `sample_grid`: ink dark on white, one labelled band per set, classes 0..9 marked on top.

    Drawn on matplotlib's Agg canvas directly (no pyplot), as rcmfn/toy/figure.py.
    """
    grid = sample_grid(sets, labels, per_class)
    fig = Figure(figsize=(grid.shape[1] / 22 + 1.6, grid.shape[0] / 22 + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=0.0, vmax=PIXEL_MAX, interpolation="nearest")
    ax.set_yticks([row * 9 + 3.5 for row in range(len(sets))], list(sets), fontsize=8)
    block = per_class * 9 + 2
    ax.set_xticks([c * block + per_class * 4.5 - 0.5 for c in range(NUM_CLASSES)], [str(c) for c in range(10)])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


@torch.no_grad()
def digit_metrics(
    classifier: DigitClassifier, samples: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, k: int = 3
) -> dict[str, float]:
    """Class accuracy of samples [N, 1, 1, 8, 8] drawn for `labels` [N], and Frechet distance and k-NN precision /
    recall of their classifier features against real `reference` digits [M, 1, 1, 8, 8].

    Non-finite samples raise ValueError (a sampler that produced NaN needs fixing, not averaging).
    """
    if samples.shape[0] != labels.shape[0]:
        raise ValueError(f"samples ({samples.shape[0]}) and labels ({labels.shape[0]}) differ in count")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain non-finite values")
    features = classifier.features(samples.double())
    real = classifier.features(reference.double())
    precision, recall = precision_recall(real, features, k)
    return {
        "accuracy": (classifier.out(features).argmax(-1) == labels).double().mean().item(),
        "fd": frechet_distance(features, real),
        "precision": precision,
        "recall": recall,
    }
