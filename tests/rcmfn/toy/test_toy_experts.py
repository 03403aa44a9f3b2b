"""rcmfn/toy/experts.py: the two-expert analytic teacher."""

import torch

from rcmfn.switch import ExpertSwitch
from rcmfn.time import UniformShift
from rcmfn.toy import gmm
from rcmfn.toy.experts import expert_mixtures, high_noise_mixture, switched_batch_fn, switched_velocity

MIXTURE = gmm.build_mixture(gmm.MixtureConfig(channels=2, height=2, width=2, std_range=(0.6, 1.0), weight_ratio=3.0))
SWITCH = ExpertSwitch(0.75)


def test_high_expert_reverses_the_mode_weights_and_keeps_the_modes():
    high = high_noise_mixture(MIXTURE, power=3.0)
    torch.testing.assert_close(high.log_weights.exp().sum(-1), torch.ones(MIXTURE.num_classes, dtype=torch.float64))
    assert torch.equal(high.means, MIXTURE.means) and torch.equal(high.stds, MIXTURE.stds)
    heavy, light = MIXTURE.log_weights.argmax(-1), MIXTURE.log_weights.argmin(-1)
    assert torch.equal(high.log_weights.argmax(-1), light) and torch.equal(high.log_weights.argmin(-1), heavy)


def test_switched_velocity_is_each_experts_exact_velocity_on_its_side():
    experts = expert_mixtures(MIXTURE)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, gmm.UNCOND])
    r = torch.tensor([0.9, 0.75, 0.3, 0.74], dtype=torch.float64)
    x = torch.randn(4, *MIXTURE.shape, generator=g, dtype=torch.float64)
    v = switched_velocity(experts, SWITCH, x, r, labels)
    high = gmm.posterior_velocity(experts["high"], x, r, labels)
    low = gmm.posterior_velocity(experts["low"], x, r, labels)
    assert torch.equal(v[:2], high[:2]) and torch.equal(v[2:], low[2:])
    assert (high - low).abs().max() > 1e-3


def test_switched_batch_targets_the_switched_field():
    batch_fn = switched_batch_fn(expert_mixtures(MIXTURE), SWITCH, 16, UniformShift(1.0), null_fraction=0.0)
    x_r, c_noise, cond, target = batch_fn(torch.Generator().manual_seed(1), torch.float64)
    assert x_r.shape == (16, *MIXTURE.shape) and cond.shape[0] == 16 and torch.isfinite(target).all()
    assert ((c_noise >= 750) & (c_noise < 1000)).any() and (c_noise < 750).any()
