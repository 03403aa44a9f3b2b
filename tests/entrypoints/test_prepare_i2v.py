"""entrypoints.prepare for image-to-video (Wan2.1 I2V): each sample's first frame becomes the CLIP image
states and the first-frame condition latent stored in the shards, through tiny random codecs."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.prepare import prepare_media
from rcmfn import codecs, media
from rcmfn.condition import make_condition
from rcmfn.image_encoder import first_frame_video, load_image_encoder, write_tiny_image_encoder
from rcmfn.models.registry import get_spec
from rcmfn.models.wan.i2v import MASK_CHANNELS
from rcmfn.shards import ShardLoader, read_manifest
from tests.entrypoints.test_prepare import clip, codec_dir, media_config, needs_codecs  # noqa: F401 (fixture)

# The registered tiny I2V net at prepare's tiny test size: 5 frames of 16 x 16, 16 text tokens of 24.
TINY_I2V = dataclasses.replace(get_spec("wan-i2v-tiny"), latent_shape=(16, 2, 2, 2), text_len=16, text_dim=24)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_image_encoder(tmp_path_factory.mktemp("clip"))


@needs_codecs
def test_i2v_shards_hold_the_first_frames_image_states_and_condition_latent(codec_dir, clip_dir, tmp_path):  # noqa: F811
    source = tmp_path / "in"
    source.mkdir()
    for i in range(2):
        media.write_mp4(source / f"v{i}.mp4", clip(5, 16, 16, 10 + i))
        (source / f"v{i}.txt").write_text(f"a w{i}")
    cfg = media_config(codec_dir, source, tmp_path / "out", model="wan-i2v-tiny", image_encoder=clip_dir)
    assert prepare_media(cfg, TINY_I2V)["written"] == 2
    manifest = read_manifest(tmp_path / "out")
    assert dict(manifest.conditions) == {"image": (5, 20), "latent": (20, 2, 2, 2)}
    shard = load_file(tmp_path / "out" / manifest.shards[1].file)  # v1 (shard size 1, sorted inputs)
    pixels = media.to_pixels(media.read_video(source / "v1.mp4")[:5])[None]
    encoder, vae = load_image_encoder(clip_dir), codecs.load_vae(codec_dir)
    states = encoder.encode(pixels[:, :, 0])
    torch.testing.assert_close(shard["condition.image"].float(), states, rtol=1e-2, atol=1e-2)  # bf16 storage
    latent = shard["condition.latent"][0].float()
    assert torch.equal(latent[:MASK_CHANNELS, 0], torch.ones(MASK_CHANNELS, 2, 2))
    assert latent[:MASK_CHANNELS, 1:].abs().max() == 0
    expected = vae.encode(first_frame_video(pixels[:, :, 0], 5))[0]
    torch.testing.assert_close(latent[MASK_CHANNELS:], expected, rtol=2e-2, atol=2e-2)

    batch = next(ShardLoader(tmp_path / "out", 2, 0, 1))
    cond = make_condition(batch.text_embeddings.double(), **{k: v.double() for k, v in batch.conditions.items()})
    module = TINY_I2V.build(TINY_I2V.config).double()
    out = TINY_I2V.velocity_net(module)(dict(module.named_parameters()), batch.latents.double(), torch.ones(2), cond)
    assert out.shape == batch.latents.shape and torch.isfinite(out).all()


@needs_codecs
def test_i2v_needs_an_image_encoder_and_t2v_refuses_one(codec_dir, clip_dir, tmp_path):  # noqa: F811
    source = tmp_path / "in"
    source.mkdir()
    media.write_mp4(source / "v.mp4", clip(5, 16, 16, 3))
    (source / "v.txt").write_text("a")
    with pytest.raises(ValueError, match="--image-encoder"):
        prepare_media(media_config(codec_dir, source, tmp_path / "a", model="wan-i2v-tiny"), TINY_I2V)
    t2v = dataclasses.replace(get_spec("wan-tiny"), latent_shape=(16, 2, 2, 2), text_len=16, text_dim=24)
    with pytest.raises(ValueError, match="no image condition"):
        prepare_media(media_config(codec_dir, source, tmp_path / "b", image_encoder=clip_dir), t2v)
