"""The Wan2.2 TI2V-5B preset and registry entry agree with the release config they cite."""

import math

import pytest
import torch

from entrypoints.config import DistillConfig, fingerprint, loop_config
from entrypoints.image_condition import image_fraction_of, training_condition
from entrypoints.presets import MODELS
from rcmfn.models.registry import get_spec
from rcmfn.models.wan.ti2v import FIRST_FRAME, USE_IMAGE


def test_preset_follows_the_release_and_the_papers_p_g_rule():
    preset, spec = MODELS["wan2.2-ti2v-5b"], get_spec("wan2.2-ti2v-5b")
    # wan_ti2v_5B.py: sample_guide_scale 5.0, sample_fps 24, frame_num 121; 1280 x 704; VAE (4, 16, 16).
    assert (preset.guidance, preset.fps) == (5.0, 24)
    assert spec.pixel_shape == (121, 704, 1280) and spec.vae_stride == (4, 16, 16)
    # The paper's rule: mean -0.8 + ln(T) / 2 at the spec's T latent frames, to the preset's one decimal.
    T = spec.latent_shape[1]
    assert abs(preset.p_G.p_mean - (-0.8 + math.log(T) / 2)) < 0.05 and preset.p_G.p_std == 1.6
    loss = loop_config(DistillConfig(model="wan2.2-ti2v-5b")).loss
    assert (loss.guidance, loss.loss_scale_dmd, loss.dmd_reference_elements) == (5.0, 1.0, 0)
    assert MODELS["wan2.2-tiny"].fps == 24 and MODELS["wan1.3b"].fps == 16


def test_image_fraction_defaults_to_the_releases_share_for_ti2v_and_is_refused_elsewhere():
    assert image_fraction_of(DistillConfig(model="wan2.2-ti2v-5b")) == 0.2  # masks_like's p
    assert image_fraction_of(DistillConfig(model="wan2.2-tiny", image_fraction=0.0)) == 0.0
    assert image_fraction_of(DistillConfig(model="wan1.3b")) == 0.0
    with pytest.raises(ValueError, match="wan1.3b nets have no first-frame image-to-video mode"):
        DistillConfig(model="wan1.3b", image_fraction=0.5)
    with pytest.raises(ValueError, match=r"image_fraction must be in \[0, 1\]; got 1.5"):
        DistillConfig(model="wan2.2-tiny", image_fraction=1.5)
    # a checkpoint records the share it trained with, and only where there is one (older runs resume)
    assert fingerprint(DistillConfig(model="wan2.2-tiny"))["image_fraction"] == 0.2
    assert "image_fraction" not in fingerprint(DistillConfig(model="wan1.3b"))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_training_condition_draws_which_samples_use_their_first_frame(fraction):
    spec = get_spec("wan2.2-tiny")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(64, *spec.latent_shape, generator=g)
    text = torch.randn(64, spec.text_len, spec.text_dim, generator=g)
    cond = training_condition(spec, text, latents, {}, fraction, torch.Generator().manual_seed(1))
    if fraction == 0.0:
        assert cond is text  # text-to-video only: nothing drawn, the plain text condition
        return
    assert torch.equal(cond[FIRST_FRAME], latents[:, :, :1]) and torch.equal(cond["text"], text)
    used = cond[USE_IMAGE].float().mean().item()
    assert used == 1.0 if fraction == 1.0 else 0.3 < used < 0.7
    again = training_condition(spec, text, latents, {}, fraction, torch.Generator().manual_seed(1))
    assert torch.equal(again[USE_IMAGE], cond[USE_IMAGE])  # drawn from the loop's generator: reproducible
