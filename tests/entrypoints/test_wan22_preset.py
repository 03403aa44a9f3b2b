"""The Wan2.2 TI2V-5B preset and registry entry agree with the release config they cite."""

import math

from entrypoints.config import DistillConfig, loop_config
from entrypoints.presets import MODELS
from rcmfn.models.registry import get_spec


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
