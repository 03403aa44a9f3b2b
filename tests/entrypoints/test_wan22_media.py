"""Wan2.2 TI2V-5B end to end on the CPU: prepare encodes media through a tiny random Wan2.2-layout VAE
(48 channels, 16x spatial) into shards; sample draws the student and the teacher and writes MP4s at the
preset's 24 fps. Tiny random weights everywhere, nothing downloaded."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.prepare import PrepareConfig, prepare_media
from entrypoints.sample import SampleConfig, sample_model
from rcmfn import codecs, media
from rcmfn.models.checkpoint import export_checkpoint
from rcmfn.models.registry import get_spec
from rcmfn.models.wan import WanModel
from rcmfn.shards import read_manifest
from rcmfn.tiny_codecs import write_tiny_wan22_vae
from tests.conftest import require_media
from tests.entrypoints.test_prepare import clip, shard_tensors
from tests.entrypoints.test_sample import random_weights

SPEC = get_spec("wan2.2-tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    require_media()
    root = tmp_path_factory.mktemp("wan22")
    for name, seed in (("student", 0), ("teacher", 1)):
        weights = random_weights(WanModel(SPEC.config), seed)
        export_checkpoint(weights, root / f"{name}.safetensors", SPEC.key_maps["official"])
    codecs.write_tiny_text_encoder(root, "umt5", dim=SPEC.text_dim)
    write_tiny_wan22_vae(root)
    return root


def sample_config(files: Path, output: Path, **overrides) -> SampleConfig:
    """sample's settings for the tiny Wan2.2 student and teacher: 1 and 2 steps, a 2-step teacher, 5 x 64 x 96."""
    base = dict(
        model="wan2.2-tiny",
        checkpoint=files / "student.safetensors",
        teacher=files / "teacher.safetensors",
        text_encoder=files,
        vae=files,
        prompts=("a b c",),
        negative_prompt="x y",
        seeds=(0,),
        steps=(1, 2),
        teacher_steps=2,
        frames=5,
        height=64,
        width=96,
        dtype="float32",
        device="cpu",
        output=output,
    )
    return SampleConfig(**(base | overrides))


def test_the_wan22_vae_has_the_release_geometry(files):
    vae = codecs.load_vae(files, stride=SPEC.vae_stride, channels=48)
    pixels = torch.rand(1, 3, 5, 32, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent = vae.encode(pixels)
    assert latent.shape == (1, 48, 2, 2, 4) and latent.abs().mean() > 0
    assert vae.decode(latent).shape == pixels.shape
    with pytest.raises(ValueError, match="not the model's VAE"):
        codecs.load_vae(files)  # asked for the Wan2.1 VAE's (4, 8, 8), 16 channels
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(pixels[..., :24])


def test_prepare_writes_48_channel_latents(files, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    media.write_mp4(source / "good.mp4", clip(6, 32, 48, 0))
    (source / "good.txt").write_text("a b c")
    cfg = PrepareConfig(
        output=tmp_path / "out",
        model="wan2.2-tiny",
        input=source,
        text_encoder=files,
        vae=files,
        negative_prompt="x y",
        frames=5,
        height=32,
        width=48,
        device="cpu",
        progress=False,
    )
    result = prepare_media(cfg, SPEC)
    assert result["written"] == 1 and not result["skipped"]
    assert read_manifest(tmp_path / "out").latent_shape == (48, 2, 2, 3)
    vae = codecs.load_vae(files, stride=SPEC.vae_stride, channels=48)
    expected = vae.encode(media.to_pixels(media.read_video(source / "good.mp4")[:5])[None])[0]
    assert torch.equal(shard_tensors(tmp_path / "out", "latents")[0], expected.to(torch.bfloat16))


def test_sample_writes_student_and_teacher_videos_at_24_fps(files, tmp_path):
    cfg = sample_config(files, tmp_path)
    report = sample_model(cfg, SPEC)
    assert list(report["rows"]) == ["student 1-step", "student 2-step", "teacher Euler 2 (cfg 5)"]
    latents = load_file(tmp_path / "latents.safetensors")
    assert all(x.shape == (1, 48, 2, 4, 6) and torch.isfinite(x).all() for x in latents.values())
    videos = sorted(tmp_path.glob("*/*.mp4"))
    assert len(videos) == 3 and media.read_video(videos[0]).shape == (5, 64, 96, 3)
    import av

    with av.open(str(videos[0])) as container:
        assert container.streams.video[0].average_rate == 24
    assert json.loads((tmp_path / "timings.json").read_text())["latent_shape"] == [48, 2, 4, 6]


def test_sample_with_an_image_starts_every_video_with_that_image(files, tmp_path):
    """TI2V's image-to-video mode: every student and teacher latent's first frame is the image's latent
    (the net answers the image's exact velocity there, rcmfn/models/wan/ti2v.py), so the decoded first
    frame is the image through the codec, even with random weights; the other frames differ per image."""
    pixels = torch.randint(0, 256, (1, 64, 96, 3), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    pixels[:, :32, :, 0] = 250  # a bright red upper half, so the image is not noise
    media.write_png(tmp_path / "image.png", pixels)
    cfg = sample_config(files, tmp_path / "with", image=tmp_path / "image.png")
    sample_model(cfg, SPEC)
    vae = codecs.load_vae(files, "cpu", stride=SPEC.vae_stride, channels=SPEC.channels)
    image_latent = vae.encode(media.to_pixels(pixels)[None])
    latents = load_file(tmp_path / "with" / "latents.safetensors")
    assert len(latents) == 3
    for name, latent in latents.items():
        torch.testing.assert_close(latent[:, :, :1], image_latent, rtol=0, atol=1e-4, msg=name)
    sample_model(replace(cfg, image=None, output=tmp_path / "without"), SPEC)  # the same net, text-to-video
    for name, latent in load_file(tmp_path / "without" / "latents.safetensors").items():
        assert (latent[:, :, :1] - image_latent).abs().max() > 0.1, name
