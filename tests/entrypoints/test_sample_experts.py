"""entrypoints.sample on a two-expert model (wan2.2-a14b-tiny): the student pair and the teacher pair, each
switching networks at the boundary, through tiny random codecs on the CPU, media written."""

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.sample import SampleConfig, sample_model
from rcmfn import codecs, media
from rcmfn.models.experts import export_experts
from rcmfn.models.registry import get_spec
from rcmfn.models.wan import WAN_TINY, WanModel
from rcmfn.samplers import consistency_sample, consistency_times
from rcmfn.switch import switched_denoiser
from tests.conftest import require_media
from tests.entrypoints.test_sample import random_weights

TINY_WAN22 = dataclasses.replace(get_spec("wan2.2-a14b-tiny"), latent_shape=(16, 2, 4, 6), text_len=16, text_dim=24)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    require_media()
    root = tmp_path_factory.mktemp("wan22")
    for name, seeds in (("student", (0, 1)), ("teacher", (2, 3))):
        weights = {e: random_weights(WanModel(WAN_TINY), s) for e, s in zip(("high", "low"), seeds, strict=True)}
        export_experts(weights, root / name, "official", TINY_WAN22)
    codecs.write_tiny_text_encoder(root, "umt5", dim=24)
    codecs.write_tiny_vae(root)
    return root


def config(root, out, **overrides) -> SampleConfig:
    base = dict(
        model="wan2.2-a14b-tiny",
        checkpoint=root / "student",
        teacher=root / "teacher",
        text_encoder=root,
        vae=root,
        prompts=("a b c",),
        negative_prompt="x y",
        seeds=(0, 1),
        teacher_steps=6,
        dtype="float64",
        device="cpu",
        output=out,
    )
    return SampleConfig(**(base | overrides))


def test_two_expert_student_and_teacher_write_media_with_the_switch(files, tmp_path):
    report = sample_model(config(files, tmp_path), TINY_WAN22)
    teacher = "teacher Euler 6 (cfg 4/3)"
    assert list(report["rows"]) == ["student 1-step", "student 2-step", "student 4-step", teacher]
    assert report["rows"][teacher]["nfe"] == 12  # both experts guided (w > 1): two calls per step
    videos = sorted(tmp_path.glob("*/*.mp4"))
    assert len(videos) == 8 and media.read_video(videos[0]).shape == (5, 32, 48, 3)
    assert (tmp_path / "contact_sheet.png").is_file()
    latents = load_file(tmp_path / "latents.safetensors")
    assert all(torch.isfinite(x).all() and x.abs().mean() > 0.01 for x in latents.values())


def test_student_steps_use_the_expert_of_their_start_time(files, tmp_path):
    """4 steps from sigma 80 with mid times 1.5, 1.4, 1.0 (r 0.934, 0.853, 0.609): high, high, low, low;
    the written 4-step latents equal that switched sampler, and differ from the low expert alone."""
    report = sample_model(config(files, tmp_path, teacher=None, vae=None, steps=(4,), seeds=(0,)), TINY_WAN22)
    assert list(report["rows"]) == ["student 4-step"]
    got = load_file(tmp_path / "latents.safetensors")["student-4-step"]
    from entrypoints.sample import load_denoiser

    spec, cfg = TINY_WAN22, config(files, tmp_path, teacher=None)
    nets = {e: load_denoiser(spec, files / "student" / f"{e}_noise_model", False, cfg, "cpu") for e in ("high", "low")}
    times = consistency_times(4, 80.0, (1.5, 1.4, 1.0))
    assert [float(t) > spec.experts.trig_boundary for t in times[:-1]] == [True, True, False, False]
    noise = torch.randn(4, *report["latent_shape"], generator=torch.Generator().manual_seed(0))[:, None]
    encoder = codecs.load_text_encoder(files, "cpu", torch.float64, spec.text_len)
    cond = encoder.encode(["a b c"])
    switched = switched_denoiser(nets["high"][0], nets["low"][0], spec.experts)
    want = consistency_sample(switched, {e: nets[e][1] for e in nets}, noise.double(), times, cond)
    low_only = consistency_sample(nets["low"][0], nets["low"][1], noise.double(), times, cond)
    torch.testing.assert_close(got.double(), want.float().double(), rtol=1e-5, atol=1e-5)
    assert (got.double() - low_only).abs().max() > 1e-3
    assert math.isclose(spec.experts.boundary, 0.875)


def test_a_single_file_student_is_refused_for_a_two_expert_model(files, tmp_path):
    with pytest.raises(ValueError, match="one entry per expert"):
        sample_model(
            config(
                files,
                tmp_path,
                checkpoint=files / "student" / "high_noise_model" / "diffusion_pytorch_model.safetensors",
            ),
            TINY_WAN22,
        )
