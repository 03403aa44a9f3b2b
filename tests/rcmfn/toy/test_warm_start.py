"""Tests for rcmfn/toy/warm_start.py: the flow-matching fit to the analytic teacher learns and is reproducible."""

import pytest
import torch

from rcmfn.toy import gmm, tiny_dit, warm_start

MIXTURE = gmm.build_mixture(gmm.MixtureConfig(height=4, width=4, num_classes=3, modes_per_class=2))
NET_CFG = tiny_dit.TinyDiTConfig(width=32, depth=1, heads=2, mlp_ratio=2, freq_dim=16)


def tiny_setup(seed: int = 0):
    module = tiny_dit.TinyDiT(NET_CFG)
    return tiny_dit.velocity_net(module), tiny_dit.init_params(module, torch.Generator().manual_seed(seed))


def test_fit_reduces_the_loss_substantially():
    net, params = tiny_setup()
    cfg = warm_start.WarmStartConfig(steps=200, batch_size=32, lr=5e-3, warmup_steps=10)
    fitted, losses = warm_start.fit_to_teacher(net, params, MIXTURE, torch.Generator().manual_seed(1), cfg)
    assert len(losses) == 200
    assert sum(losses[-20:]) / 20 < 0.3 * losses[0]
    before = warm_start.velocity_error(net, params, MIXTURE, torch.Generator().manual_seed(2), n=256)
    after = warm_start.velocity_error(net, fitted, MIXTURE, torch.Generator().manual_seed(2), n=256)
    assert after["relative_mse"] < 0.3 * before["relative_mse"]


def test_fit_is_reproducible_and_leaves_input_params_alone():
    net, params = tiny_setup()
    original = params.clone()
    cfg = warm_start.WarmStartConfig(steps=3, batch_size=8, warmup_steps=1)
    a, losses_a = warm_start.fit_to_teacher(net, params, MIXTURE, torch.Generator().manual_seed(3), cfg)
    b, losses_b = warm_start.fit_to_teacher(net, params, MIXTURE, torch.Generator().manual_seed(3), cfg)
    assert losses_a == losses_b
    assert all(torch.equal(a[k], b[k]) for k in a.keys())
    assert all(torch.equal(params[k], original[k]) for k in params.keys())
    assert not all(torch.equal(a[k], params[k]) for k in a.keys())
    assert not any(p.requires_grad for p in a.values())


def test_teacher_batch_pairs_points_with_the_exact_teacher_velocity():
    labels = torch.tensor([0, gmm.UNCOND, 2, 1, 1])
    x_r, c_noise, cond, target = warm_start.teacher_batch(
        MIXTURE, labels, warm_start.UniformShift(1.0), torch.Generator().manual_seed(4), dtype=torch.float64
    )
    assert x_r.shape == target.shape == (5, *MIXTURE.shape) and c_noise.shape == (5,)
    assert torch.equal(gmm.labels_from_cond(MIXTURE, cond), labels)
    assert ((c_noise >= 0) & (c_noise < 1000)).all()
    torch.testing.assert_close(gmm.velocity(MIXTURE, x_r, c_noise, cond), target, rtol=1e-12, atol=1e-12)


def test_teacher_itself_has_zero_velocity_error():
    err = warm_start.velocity_error(
        gmm.velocity, MIXTURE, MIXTURE, torch.Generator().manual_seed(5), n=64, dtype=torch.float64
    )
    assert err["mse"] < 1e-20 and err["relative_mse"] < 1e-20


def test_draw_labels_respects_null_fraction():
    g = torch.Generator().manual_seed(6)
    assert (warm_start.draw_labels(MIXTURE, 100, 0.0, g) >= 0).all()
    assert (warm_start.draw_labels(MIXTURE, 100, 1.0, g) == gmm.UNCOND).all()
    labels = warm_start.draw_labels(MIXTURE, 4000, 0.1, g)
    assert abs((labels == gmm.UNCOND).double().mean().item() - 0.1) < 0.02
    assert set(labels.unique().tolist()) == {gmm.UNCOND, 0, 1, 2}


def test_learning_rate_warms_up_then_decays_to_the_final_ratio():
    cfg = warm_start.WarmStartConfig(steps=100, lr=1e-3, warmup_steps=10, lr_final_ratio=0.1)
    rates = [warm_start.learning_rate(s, cfg) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert warm_start.learning_rate(100, cfg) == pytest.approx(1e-4)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="null_fraction"):
        warm_start.WarmStartConfig(null_fraction=1.5)
    with pytest.raises(ValueError, match="steps and batch_size"):
        warm_start.WarmStartConfig(steps=0)
