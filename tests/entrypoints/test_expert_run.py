"""distill --expert: one expert of a two-expert model per run (entrypoints/expert_run.py)."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.config import DistillConfig, loop_config
from entrypoints.expert_run import expert_teacher
from entrypoints.presets import get_preset
from rcmfn.models.registry import get_spec
from rcmfn.time import Truncated
from tests.conftest import require_media
from tests.entrypoints.test_prepare import codec_dir  # noqa: F401, F811 (a fixture)


def test_two_expert_models_need_one_expert_per_run_and_others_take_none():
    from entrypoints.distributed import check_before_gpu

    cfg = DistillConfig(model="wan2.2-a14b-tiny")  # a config without --expert is fine until a run starts
    with pytest.raises(ValueError, match="has two experts: distil one per run with --expert"):
        check_before_gpu(cfg, world_size=1)
    with pytest.raises(ValueError, match="--expert high: model 'wan-tiny' has one network"):
        DistillConfig(model="wan-tiny", expert="high")
    with pytest.raises(ValueError, match="one network"):
        DistillConfig(expert="low")  # the toy


@pytest.mark.parametrize("expert", ["high", "low"])
def test_an_expert_run_trains_over_its_range_with_its_guidance(expert):
    switch, preset = get_spec("wan2.2-a14b-tiny").experts, get_preset("wan2.2-a14b-tiny")
    loss = loop_config(DistillConfig(model="wan2.2-a14b-tiny", expert=expert)).loss
    lo, hi = switch.trig_range(expert)
    assert loss.p_G == Truncated(preset.p_G, lo, hi) and loss.p_D == Truncated(preset.p_D, lo, hi)
    assert loss.guidance == {"high": 4.0, "low": 3.0}[expert]
    assert loss.rollout_start == (None if expert == "high" else pytest.approx(math.atan(7.0)))
    assert loop_config(DistillConfig(model="wan2.2-a14b-tiny", expert=expert, guidance=6.0)).loss.guidance == 6.0
    one = loop_config(DistillConfig(model="wan-tiny")).loss  # a one-network model: unchanged
    assert one.p_G == get_preset("wan-tiny").p_G and one.rollout_start is None


def test_an_expert_runs_teacher_is_its_folder_of_the_release(tmp_path):
    for folder in ("high_noise_model", "low_noise_model", "transformer", "transformer_2"):
        (tmp_path / folder).mkdir()
    assert expert_teacher(tmp_path, "official", "wan2.2-a14b-tiny", "low") == tmp_path / "low_noise_model"
    assert expert_teacher(tmp_path, "diffusers", "wan2.2-a14b-tiny", "high") == tmp_path / "transformer"
    assert expert_teacher(tmp_path / "x.safetensors", "official", "wan-tiny", None) == tmp_path / "x.safetensors"
    (tmp_path / "low_noise_model").rmdir()
    with pytest.raises(FileNotFoundError, match="no low-noise expert.*high_noise_model and low_noise_model"):
        expert_teacher(tmp_path, "official", "wan2.2-a14b-tiny", "low")


def test_both_expert_runs_train_from_the_release_folder_and_sample_together(tmp_path):
    """distill --expert high / low from one official two-expert teacher folder (float64, 4 iterations each:
    student with sCM + DMD, then critic), then `sample` with the two exports linked as a student pair."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from rcmfn import codecs
    from rcmfn.models.experts import export_experts
    from rcmfn.models.wan import WAN_TINY, WanModel
    from rcmfn.shards import ShardWriter, write_negative_embedding

    require_media()
    g = torch.Generator().manual_seed(0)
    with ShardWriter(tmp_path / "data", (16, 1, 4, 4), (3, 24), "float32", 3) as writer:
        for i in range(4):
            writer.add(torch.randn(16, 1, 4, 4, generator=g), torch.randn(3, 24, generator=g), f"prompt {i}")
    write_negative_embedding(tmp_path / "data", torch.randn(3, 24, generator=g))
    weights = {}
    for expert, seed in (("high", 1), ("low", 2)):
        torch.manual_seed(seed)
        weights[expert] = {k: v.detach() for k, v in WanModel(WAN_TINY).named_parameters()}
    export_experts(weights, tmp_path / "teacher", "official", get_spec("wan2.2-a14b-tiny"))
    root, env = Path(__file__).resolve().parents[2], os.environ | {"OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(root)
    students = tmp_path / "students"
    students.mkdir()
    for expert, folder in (("high", "high_noise_model"), ("low", "low_noise_model")):
        run = tmp_path / f"run-{expert}"
        args = ["--model", "wan2.2-a14b-tiny", "--expert", expert, "--distributed.teacher", str(tmp_path / "teacher")]
        args += ["--distributed.data", str(tmp_path / "data"), "--distributed.dtype", "float64", "--output", str(run)]
        args += ["--iterations", "4", "--student-update-freq", "2", "--log-every", "1", "--no-progress"]
        done = subprocess.run(
            [sys.executable, "-m", "entrypoints.distill", *args], cwd=root, env=env, capture_output=True
        )
        assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["phase"] for m in lines] == ["student", "critic"] * 2
        assert all(math.isfinite(m["dmd_loss"]) and m["dmd_loss"] > 0 for m in lines if m["phase"] == "student")
        (students / f"{folder}.safetensors").symlink_to(run / "student_ema.safetensors")
    codecs.write_tiny_text_encoder(tmp_path, "umt5", dim=24)
    codecs.write_tiny_vae(tmp_path)
    args = ["--model", "wan2.2-a14b-tiny", "--checkpoint", str(students), "--teacher", str(tmp_path / "teacher")]
    args += ["--text-encoder", str(tmp_path), "--vae", str(tmp_path), "--prompts", "a b", "--negative-prompt", "x"]
    args += ["--frames", "1", "--height", "32", "--width", "32", "--teacher-steps", "4", "--dtype", "float32"]
    args += ["--device", "cpu", "--output", str(tmp_path / "samples")]
    done = subprocess.run([sys.executable, "-m", "entrypoints.sample", *args], cwd=root, env=env, capture_output=True)
    assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]
    pngs = sorted(p.parent.name for p in (tmp_path / "samples").glob("*/*.png"))
    assert pngs == ["student-1-step", "student-2-step", "student-4-step", "teacher-Euler-4"]


def test_prepare_writes_shards_for_the_two_expert_model(codec_dir, tmp_path):  # noqa: F811
    """Captioned media -> shards for wan2.2-a14b-tiny: the data are the experts' common input (both take the
    same latents and text), so prepare treats the model like any other."""
    import dataclasses

    from entrypoints.prepare import prepare_media
    from rcmfn.shards import read_manifest
    from tests.entrypoints.test_prepare import TINY_WAN, media_config, media_folder

    spec = dataclasses.replace(
        get_spec("wan2.2-a14b-tiny"), latent_shape=TINY_WAN.latent_shape, text_len=16, text_dim=24
    )
    cfg = media_config(codec_dir, media_folder(tmp_path / "in"), tmp_path / "out", model="wan2.2-a14b-tiny")
    assert prepare_media(cfg, spec)["written"] == 2
    assert read_manifest(tmp_path / "out").latent_shape == (16, 2, 2, 2)


def test_prepare_from_a_two_expert_teacher_samples_with_the_switched_pair(tmp_path):
    """--from-teacher with wan2.2-a14b-tiny's official folder: each sample is the switched Euler sampler's (shift
    12, guidance 4 above the boundary and 3 below), teacher.json records both weights and the boundary."""
    from entrypoints.sample import SampleConfig, load_denoiser
    from entrypoints.teacher_data import prepare_from_teacher
    from rcmfn.models.experts import export_experts
    from rcmfn.models.wan import WanModel
    from rcmfn.samplers import teacher_rf_times
    from rcmfn.shards import read_manifest
    from rcmfn.switch import switched_teacher_euler_sample
    from tests.entrypoints.test_sample import random_weights
    from tests.entrypoints.test_teacher_data import LATENT, TINY_WAN, config, files  # noqa: F401

    pytest.importorskip("transformers")
    spec = dataclasses.replace(
        get_spec("wan2.2-a14b-tiny"), latent_shape=TINY_WAN.latent_shape, text_len=16, text_dim=24
    )
    weights = {e: random_weights(WanModel(spec.config), s) for e, s in (("high", 5), ("low", 6))}
    export_experts(weights, tmp_path / "teacher", "official", spec)
    codecs_dir = tmp_path / "codecs"
    from rcmfn import codecs

    codecs.write_tiny_text_encoder(codecs_dir, "umt5", dim=24)
    (codecs_dir / "prompts.txt").write_text("a b c\nw1 w2\n")
    cfg = config(codecs_dir, tmp_path / "out", teacher=tmp_path / "teacher")
    cfg = dataclasses.replace(cfg, model="wan2.2-a14b-tiny")
    assert prepare_from_teacher(cfg, spec)["written"] == 2
    saved = json.loads((tmp_path / "out" / "teacher.json").read_text())["sampler"]
    assert saved["guidance"] == {"high": 4.0, "low": 3.0, "boundary": 0.875} and saved["shift"] == 12.0
    manifest = read_manifest(tmp_path / "out")
    shard = load_file(tmp_path / "out" / manifest.shards[0].file)
    loader = SampleConfig(model="wan2.2-a14b-tiny", dtype="float32")
    pair = {
        e: load_denoiser(spec, tmp_path / "teacher" / f"{e}_noise_model", False, loader, "cpu") for e in ("high", "low")
    }
    noise = torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(3_000_009 + i)) for i in (0, 1)])
    cond = shard["text_embeddings"]
    uncond = load_file(tmp_path / "out" / "negative.safetensors")
    uncond = next(iter(uncond.values())).expand_as(cond)
    rf = teacher_rf_times(3, 12.0, 80.0)
    want = switched_teacher_euler_sample(pair, spec.experts, noise, rf, cond, uncond).to(torch.bfloat16)
    assert torch.equal(shard["latents"], want) and want.float().std() > 0.1
