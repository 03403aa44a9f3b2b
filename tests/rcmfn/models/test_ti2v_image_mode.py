"""Wan2.2 TI2V's image-to-video mode (rcmfn/models/wan/ti2v.py): the release's input for image samples,
the image's exact velocity on their first frame, text-to-video for the others; float64 references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.models.registry import get_spec, random_model
from rcmfn.models.wan.ti2v import first_frame_condition, first_frame_timesteps, keep_first_frame
from rcmfn.precond import trigflow_denoiser, x0_from_velocity

SPEC = get_spec("wan2.2-tiny")
MODEL = random_model(SPEC, torch.float64, seed=3)
PARAMS = dict(MODEL.named_parameters())
NET = SPEC.velocity_net(MODEL)
DENOISE = trigflow_denoiser(NET)


def batch(use: list[bool], seed: int = 0):
    """(x_t, text, first frame, condition) of len(use) samples, N(0, 1) draws."""
    g = torch.Generator().manual_seed(seed)
    B, (C, _, H, W) = len(use), SPEC.latent_shape
    x = torch.randn(B, *SPEC.latent_shape, generator=g, dtype=torch.float64)
    text = torch.randn(B, SPEC.text_len, SPEC.text_dim, generator=g, dtype=torch.float64)
    first = torch.randn(B, C, 1, H, W, generator=g, dtype=torch.float64)
    return x, text, first, first_frame_condition(text, first, torch.tensor(use))


@settings(max_examples=12, deadline=None)
@given(
    use=st.lists(st.booleans(), min_size=1, max_size=3),
    t=st.floats(0.01, 1.5607),
    seed=st.integers(0, 2**16),
)
def test_image_samples_denoise_to_their_image_on_the_first_frame(use, t, seed):
    x, _, first, cond = batch(use, seed)
    times = torch.full((len(use),), t, dtype=torch.float64)
    x0 = x0_from_velocity(x, times, DENOISE(PARAMS, x, times, cond))
    picked = torch.tensor(use)
    torch.testing.assert_close(x0[picked, :, :1], first[picked], rtol=0, atol=1e-12)
    if not all(use):  # a text sample's first frame is the net's own prediction, not the given frame
        assert (x0[~picked, :, :1] - first[~picked]).abs().max() > 1e-3


def test_text_samples_are_the_text_to_video_net_and_image_samples_the_release_input():
    x, text, first, cond = batch([True, False, True], seed=4)
    timestep = torch.tensor([300.0, 650.0, 900.0], dtype=torch.float64)
    got = NET(PARAMS, x, timestep, cond)
    plain = NET(PARAMS, x, timestep, text)
    torch.testing.assert_close(got[1], plain[1], rtol=0, atol=1e-12)
    grid = (SPEC.latent_shape[1], SPEC.latent_shape[2] // 2, SPEC.latent_shape[3] // 2)
    release = MODEL(keep_first_frame(x, first), first_frame_timesteps(timestep, grid), text)  # textimage2video.py
    torch.testing.assert_close(got[[0, 2], :, 1:], release[[0, 2], :, 1:], rtol=0, atol=1e-12)
    exact = (x[:, :, :1] - first) / (timestep / 1000.0).view(-1, 1, 1, 1, 1)  # x_r - r v = image
    torch.testing.assert_close(got[[0, 2], :, :1], exact[[0, 2]], rtol=0, atol=1e-12)


def test_the_first_frame_of_an_image_sample_adds_no_gradient_and_no_consistency_tangent():
    """What makes the losses need no mask: no weight reaches the image's first frame, and its consistency
    function x0(x_t, t) is constant along any direction in (x_t, t), so its sCM tangent vanishes."""
    x, _, _, cond = batch([True, True], seed=5)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    out = DENOISE(PARAMS, x, t, cond)
    grads = torch.autograd.grad(
        out[:, :, :1].square().sum(), list(PARAMS.values()), allow_unused=True, retain_graph=True
    )
    assert all(g is None or not g.any() for g in grads)
    assert torch.autograd.grad(out[:, :, 1:].square().sum(), PARAMS["patch_embedding.weight"])[0].abs().max() > 0
    g = torch.Generator().manual_seed(6)
    tangents = (torch.randn(x.shape, generator=g, dtype=x.dtype), torch.ones_like(t))
    x0 = lambda x, t: x0_from_velocity(x, t, DENOISE(PARAMS, x, t, cond))  # noqa: E731
    _, tangent = torch.func.jvp(x0, (x, t), tangents)
    assert tangent[:, :, 1:].abs().max() > 1e-2
    torch.testing.assert_close(tangent[:, :, :1], torch.zeros_like(tangent[:, :, :1]), rtol=0, atol=1e-10)


def test_condition_shapes_are_checked():
    x, text, first, _ = batch([True, False])
    with pytest.raises(ValueError, match=r"first frame latent must be \[2, C, 1, H, W\]"):
        first_frame_condition(text, x, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"use_image must be \[2\]"):
        first_frame_condition(text, first, torch.tensor([True]))
    cond = first_frame_condition(text, first[:, :, :, :2], torch.tensor([True, False]))
    with pytest.raises(ValueError, match="first frame latent must be"):
        NET(PARAMS, x, torch.tensor([300.0, 500.0], dtype=torch.float64), cond)
