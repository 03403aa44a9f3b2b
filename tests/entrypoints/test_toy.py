"""entrypoints/toy.py: the evaluation's capacity-control and noise-band rows, on the exact mixture teacher."""

import math

import pytest
import torch

from entrypoints import toy as toy_world
from entrypoints.toy import BAND_SIGMAS, ToyConfig, ToyWorld
from rcmfn.precond import trigflow_denoiser
from rcmfn.samplers import teacher_euler_sample, teacher_rf_times
from rcmfn.toy import gmm
from rcmfn.toy.metrics import expected_counts
from rcmfn.toy.tiny_dit import TinyDiTConfig
from rcmfn.toy.warm_start import WarmStartConfig

TEACHER = trigflow_denoiser(gmm.velocity, time_dtype=torch.float64)


def exact_world(eval_samples: int = 240) -> ToyWorld:
    """A world whose 'student' (and warm start) is the exact teacher itself, so every row has a known answer."""
    cfg = ToyConfig(eval_samples=eval_samples)
    mixture = gmm.build_mixture(cfg.mixture)
    return ToyWorld(cfg, mixture, None, TEACHER, TEACHER, mixture, {})


def ode_map(mixture: gmm.GaussianMixture, steps: int = 20):
    """The exact teacher's PF-ODE solved from (x_t, t) to 0 (Euler, no CFG): what a perfect student maps to."""

    def one_step(x_t, t, cond):
        t0 = float(t[0])
        x_r = x_t.double() / (math.cos(t0) + math.sin(t0))
        return teacher_euler_sample(TEACHER, mixture, x_r, teacher_rf_times(steps, 1.0, math.tan(t0)), cond.double())

    return one_step


def test_band_of_an_ode_solving_map_is_on_mode_and_of_a_posterior_mean_is_not():
    """The band rows measure the map, not its input: solving the ODE from the exact marginal lands every
    sample on a mode at every sigma, while the posterior mean E[x0 | x_t] (the exact denoiser) is the
    class's weighted mean of modes at sigma 80 -- between them -- and on a mode only at small sigma."""
    world = exact_world()
    posterior_mean = toy_world.student_map(world, world.mixture)  # the exact teacher's x0 = E[x0 | x_t]
    for sigma in BAND_SIGMAS:
        solved = toy_world.evaluate(world, toy_world.band_samples(world, ode_map(world.mixture), sigma, 0), 0)
        assert solved["off_mode"] == 0.0 and solved["coverage"] == 1.0, (sigma, solved)
        assert 0.85 < solved["spread"] < 1.15, (sigma, solved)
    off = {
        s: toy_world.evaluate(world, toy_world.band_samples(world, posterior_mean, s, 0), 0)["off_mode"]
        for s in (80.0, 1.0)
    }
    assert off[80.0] > 0.95 and off[1.0] == 0.0


def test_student_map_is_x0_of_the_denoiser_in_float64():
    """student_map returns cos t x_t - sin t F: for the exact teacher that is gmm.posterior_mean (float64)."""
    world = exact_world(eval_samples=16)
    labels = toy_world.eval_labels(world)
    for sigma in (80.0, 2.6, 0.3):
        x_t = toy_world.band_samples(world, lambda x, t, c: x, sigma, 3)  # the identity map returns x_t itself
        t = torch.full((16,), math.atan(sigma), dtype=torch.float64)
        got = toy_world.student_map(world, world.mixture)(x_t, t, gmm.class_embeddings(world.mixture, labels).float())
        r = torch.sin(t) / (torch.sin(t) + torch.cos(t))
        want = gmm.posterior_mean(
            world.mixture, x_t.double() / (torch.cos(t) + torch.sin(t))[:, None, None, None, None], r, labels
        )
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_band_samples_are_the_exact_marginal_at_sigma():
    """x_t = cos t x0 + sin t eps: its mean square per element is sin^2 t + cos^2 t E|x0|^2 / dim."""
    world = exact_world(eval_samples=4000)
    mixture = world.mixture
    share = expected_counts(mixture, toy_world.eval_labels(world)) / 4000  # [classes * K]
    x0_square = (
        share
        * (mixture.means.reshape(share.shape[0], -1).square().sum(-1) / mixture.dim + mixture.stds.reshape(-1) ** 2)
    ).sum()
    for sigma in (80.0, 1.0):
        x_t = toy_world.band_samples(world, lambda x, t, c: x, sigma, 0)  # the identity map returns x_t itself
        assert x_t.shape == (4000, *mixture.shape) and x_t.dtype == torch.float32
        t = math.atan(sigma)
        want = math.sin(t) ** 2 + math.cos(t) ** 2 * x0_square.item()
        assert x_t.double().square().mean().item() == pytest.approx(want, rel=0.01)


def test_warm_start_row_samples_the_warm_started_net_like_the_teacher():
    """With the exact teacher as the warm-started net, the capacity-control row is the teacher's row."""
    world = exact_world(eval_samples=32)
    torch.testing.assert_close(
        toy_world.sample_warm_start(world, 8, 2.0, seed=5), toy_world.sample_teacher(world, 8, 2.0, seed=5)
    )


def test_sampler_table_has_every_row_with_the_evaluation_shape(tmp_path):
    """Rows in table order with one sample per evaluation label; the figure has the capacity-control column."""
    cfg = ToyConfig(
        net=TinyDiTConfig(width=16, depth=1, heads=2, mlp_ratio=1, freq_dim=8),
        warm_start=WarmStartConfig(steps=2, batch_size=4, warmup_steps=1),
        eval_samples=12,
    )
    world = toy_world.build_toy(cfg, seed=0, progress=False)
    report, figure = toy_world.final_report(world, world.init_params, 0, guidance=2.0, sigma_max=80.0)
    names = list(report["rows"])
    assert names == [
        "exact data",
        "teacher Euler 4 (cfg 2)",
        "teacher Euler 8 (cfg 2)",
        "teacher Euler 50 (cfg 2)",
        "warm start Euler 50 (cfg 2)",
        "student 1-step",
        "student 2-step",
        "student 4-step",
        *[f"student map from sigma {s:g}" for s in BAND_SIGMAS],
    ]
    assert all(
        set(row) >= {"off_mode", "weight_tv", "spread", "sliced_w2", "seconds"} for row in report["rows"].values()
    )
    assert list(figure) == ["exact", "teacher 50", "warm start 50", "student 1", "student 2", "student 4"]
    assert all(x.shape == (12, *world.mixture.shape) for x in figure.values())
    toy_world.save_sets_figure(world, figure, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert "warm start Euler 50 (cfg 2)" in toy_world.format_table(report["rows"])
