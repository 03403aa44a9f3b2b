"""entrypoints.sample --image for image-to-video (Wan2.1 I2V) through tiny random codecs and nets.

What this proves: the image (its CLIP states and its first-frame VAE latent) reaches every student and
teacher row, deterministically, and media are written. It cannot prove that the first output frame looks
like the image: that needs trained weights (random tiny nets and a random VAE map any input anywhere).
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.sample import SampleConfig, sample_model
from rcmfn import codecs, media
from rcmfn.image_encoder import write_tiny_image_encoder
from rcmfn.models.checkpoint import export_checkpoint
from rcmfn.models.registry import get_spec
from rcmfn.models.wan import WanModel
from rcmfn.models.wan.configs import WAN_I2V_TINY
from tests.conftest import require_media
from tests.entrypoints.test_sample import random_weights

# The registered tiny I2V net: 5 frames of 32 x 48 pixels, 16 text tokens of width 24, CLIP 5 x 20.
TINY_I2V = dataclasses.replace(get_spec("wan-i2v-tiny"), latent_shape=(16, 2, 4, 6), text_len=16, text_dim=24)


@pytest.fixture(scope="module")
def i2v_files(tmp_path_factory) -> Path:
    require_media()
    root = tmp_path_factory.mktemp("i2v")
    for name, seed in (("student", 0), ("teacher", 1)):
        weights = random_weights(WanModel(WAN_I2V_TINY), seed)
        export_checkpoint(weights, root / f"{name}.safetensors", TINY_I2V.key_maps["official"])
    codecs.write_tiny_text_encoder(root, "umt5", dim=24)
    codecs.write_tiny_vae(root)
    write_tiny_image_encoder(root)
    for name, seed in (("red", 0), ("noise", 1)):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (1, 40, 60, 3), generator=g, dtype=torch.uint8)
        if name == "red":
            pixels[..., 0], pixels[..., 1:] = 230, 20
        media.write_png(root / f"{name}.png", pixels)
    return root


def i2v_config(root: Path, out: Path, **overrides) -> SampleConfig:
    base = dict(
        model="wan-i2v-tiny",
        checkpoint=root / "student.safetensors",
        teacher=root / "teacher.safetensors",
        text_encoder=root,
        vae=root,
        image_encoder=root,
        image=root / "red.png",
        prompts=("a b",),
        negative_prompt="x y",
        steps=(1, 2),
        teacher_steps=2,
        dtype="float32",
        device="cpu",
        output=out,
    )
    return SampleConfig(**(base | overrides))


def test_the_image_reaches_every_row_and_media_are_written(i2v_files, tmp_path):
    report = sample_model(i2v_config(i2v_files, tmp_path / "a"), TINY_I2V)
    assert list(report["rows"]) == ["student 1-step", "student 2-step", "teacher Euler 2 (cfg 5)"]
    assert len(sorted((tmp_path / "a").glob("*/*.mp4"))) == 3
    sample_model(i2v_config(i2v_files, tmp_path / "b", vae=i2v_files), TINY_I2V)
    sample_model(i2v_config(i2v_files, tmp_path / "c", image=i2v_files / "noise.png"), TINY_I2V)
    first, again, other = (load_file(tmp_path / d / "latents.safetensors") for d in "abc")
    for row in first:
        assert torch.equal(first[row], again[row]) and torch.isfinite(first[row]).all()
        assert (first[row] - other[row]).abs().max() > 1e-3, row  # another image, another sample


def test_an_image_model_needs_an_image_and_a_text_model_refuses_one(i2v_files, tmp_path):
    with pytest.raises(ValueError, match="--image"):
        sample_model(i2v_config(i2v_files, tmp_path / "a", image=None), TINY_I2V)
    with pytest.raises(ValueError, match="--image-encoder"):
        sample_model(i2v_config(i2v_files, tmp_path / "b", image_encoder=None), TINY_I2V)
    t2v = dataclasses.replace(get_spec("wan-tiny"), latent_shape=(16, 2, 4, 6), text_len=16, text_dim=24)
    with pytest.raises(ValueError, match="no image condition"):
        sample_model(i2v_config(i2v_files, tmp_path / "c", model="wan-tiny", teacher=None), t2v)


@pytest.mark.parametrize(("shift", "want"), [(None, 3.0), (4.0, 4.0)])
def test_teacher_shift_defaults_to_the_i2v_presets(i2v_files, tmp_path, monkeypatch, shift, want):
    """wan-i2v-tiny samples with the 480p preset's shift 3 (Wan2.1 generate.py's I2V 832 x 480 default)."""
    import entrypoints.sample as sample_module

    seen = []
    real = sample_module.teacher_rf_times
    monkeypatch.setattr(sample_module, "teacher_rf_times", lambda n, s, m: seen.append(s) or real(n, s, m))
    sample_model(i2v_config(i2v_files, tmp_path, vae=i2v_files, steps=(1,), shift=shift), TINY_I2V)
    assert seen == [want]
