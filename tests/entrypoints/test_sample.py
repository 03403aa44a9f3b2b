"""entrypoints.sample: the toy figure from a distill run, tiny Wan / Cosmos sampling through tiny random
text encoders and VAEs (no downloads), determinism, the one-step formula, and clear errors."""

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.distill import DistillConfig
from entrypoints.distill import run as distill
from entrypoints.sample import SampleConfig, load_denoiser, main, sample_model, sample_toy
from entrypoints.toy import ToyConfig
from rcmfn import codecs, media
from rcmfn.models import cosmos
from rcmfn.models.checkpoint import CheckpointMismatchError, export_checkpoint
from rcmfn.models.registry import get_spec
from rcmfn.models.wan import WAN_TINY, WanModel
from rcmfn.toy.tiny_dit import TinyDiTConfig
from rcmfn.toy.warm_start import WarmStartConfig
from tests.conftest import cli_flags, has_media, require_media

needs_codecs = pytest.mark.skipif(
    not has_media(),
    reason="text encoder / VAE / MP4 tests need the media extra (pip install 'rcmfn[media]')",
)
TINY_TOY = ToyConfig(
    net=TinyDiTConfig(width=32, depth=1, heads=2, mlp_ratio=2, freq_dim=16),
    warm_start=WarmStartConfig(steps=5, batch_size=8, warmup_steps=1),
    batch_size=4,
    eval_samples=8,
)
# Registered specs with tiny architectures: 5 frames of 32 x 48 pixels, 16 text tokens of width 24.
TINY_WAN = dataclasses.replace(
    get_spec("wan1.3b"),
    config=WAN_TINY,
    latent_shape=(16, 2, 4, 6),
    text_len=16,
    text_dim=24,
)
TINY_COSMOS = dataclasses.replace(
    get_spec("cosmos2b"), config=cosmos.CONFIGS["cosmos-tiny"], latent_shape=(16, 1, 4, 6), text_len=16, text_dim=24
)
FLAGS = """--batch --checkpoint --device --dtype --fps --frames --guidance --height --help --image --image-encoder
--layout --mid-times
--model --negative-prompt --no-strict --output --prompt-file --prompts --run --seeds --shift --sigma-max --steps
--strict --teacher --teacher-steps --text-encoder --vae --weights --width""".split()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toyrun")
    distill(
        DistillConfig(
            output=out,
            iterations=3,
            tangent_warmup=1,
            student_update_freq=2,
            save_every=3,
            progress=False,
            toy=TINY_TOY,
        )
    )
    return out


def random_weights(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter N(0, 0.3^2) (+1 for norm weights): no zero-initialised layer hides a wiring bug."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: 0.3 * torch.randn(p.shape, generator=gen) + (1.0 if "norm" in name and name.endswith("weight") else 0)
        for name, p in module.state_dict().items()
    }


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory) -> Path:
    require_media()
    root = tmp_path_factory.mktemp("wan")
    for name, seed in (("student", 0), ("teacher", 1)):
        export_checkpoint(
            random_weights(WanModel(WAN_TINY), seed), root / f"{name}.safetensors", TINY_WAN.key_maps["official"]
        )
    codecs.write_tiny_text_encoder(root, "umt5", dim=24)
    codecs.write_tiny_vae(root)
    return root


def wan_config(root: Path, out: Path, **overrides) -> SampleConfig:
    base = dict(
        model="wan1.3b",
        checkpoint=root / "student.safetensors",
        teacher=root / "teacher.safetensors",
        text_encoder=root,
        vae=root,
        prompts=("a b c", "w1 w2 w3"),
        seeds=(0, 1),
        negative_prompt="x y",
        teacher_steps=3,
        dtype="float32",
        device="cpu",
        output=out,
    )
    return SampleConfig(**(base | overrides))


def test_toy_evaluates_the_distill_runs_checkpoint_as_distill_did(toy_run, tmp_path):
    """The 1-step row (no mid times) equals the distill run's own; the run's figure is not redrawn pixel
    for pixel: it also has the warm-started net's column, which a checkpoint does not hold."""
    report = sample_toy(SampleConfig(run=toy_run, output=tmp_path, teacher_steps=4))["seed 0"]
    distilled = json.loads((toy_run / "metrics.json").read_text())["rows"]["student 1-step"]
    assert {k: v for k, v in report["rows"]["student 1-step"].items() if k in distilled and k != "seconds"} == {
        k: v for k, v in distilled.items() if k != "seconds"
    }
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report["rows"]
    assert list(rows) == ["student 1-step", "student 2-step", "student 4-step", "teacher Euler 4 (cfg 2)"]
    assert [r["nfe"] for r in rows.values()] == [1, 2, 4, 8]
    assert all(0 <= r["coverage"] <= 1 and r["seconds_per_sample"] > 0 for r in rows.values())
    assert json.loads((tmp_path / "metrics.json").read_text())["seed 0"]["checkpoint"].endswith("ema.safetensors")


def test_toy_cli_prints_metrics_and_the_speed_up(toy_run, tmp_path, monkeypatch, capsys):
    argv = [
        "sample",
        "--run",
        str(toy_run),
        "--output",
        str(tmp_path),
        "--steps",
        "1",
        "2",
        "--seeds",
        "0",
        "3",
        "--weights",
        "student",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    out = capsys.readouterr().out
    assert "speed-up" in out and "sliced_w2" in out and "teacher Euler 50 (cfg 2)" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["samples-seed0.png", "samples-seed3.png"]


def test_toy_needs_a_run_checkpoint_and_the_default_mid_times(toy_run, tmp_path):
    ckpt = next((toy_run / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="needs a distill run folder"):
        sample_toy(SampleConfig(checkpoint=ckpt / "ema.safetensors", output=tmp_path))
    with pytest.raises(ValueError, match="default mid times"):
        sample_toy(SampleConfig(checkpoint=ckpt, mid_times=(1.3, 1.0, 0.6), output=tmp_path))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        sample_toy(SampleConfig(run=tmp_path, output=tmp_path))


@needs_codecs
def test_wan_student_and_teacher_write_media_contact_sheet_and_timings(wan_files, tmp_path):
    report = sample_model(wan_config(wan_files, tmp_path, batch=3), TINY_WAN)
    names = ["student 1-step", "student 2-step", "student 4-step", "teacher Euler 3 (cfg 5)"]
    assert list(report["rows"]) == names and [r["nfe"] for r in report["rows"].values()] == [1, 2, 4, 6]
    assert "speed-up" in report["table"] and all(r["decode_seconds_per_sample"] > 0 for r in report["rows"].values())
    latents = load_file(tmp_path / "latents.safetensors")
    assert sorted(latents) == sorted(n.split(" (")[0].replace(" ", "-") for n in names)
    assert all(x.shape == (4, 16, 2, 4, 6) and torch.isfinite(x).all() for x in latents.values())
    videos = sorted(tmp_path.glob("*/*.mp4"))
    assert len(videos) == 16
    assert {v.name for v in videos} == {"p000-s0.mp4", "p000-s1.mp4", "p001-s0.mp4", "p001-s1.mp4"}
    assert media.read_video(videos[0]).shape == (5, 32, 48, 3)
    sheet = media.read_image(tmp_path / "contact_sheet.png")[0]
    assert sheet.shape[0] > 4 * 32 and sheet.shape[1] > 4 * 48
    assert json.loads((tmp_path / "timings.json").read_text())["latent_shape"] == [16, 2, 4, 6]


@needs_codecs
def test_samples_repeat_for_a_seed_and_do_not_depend_on_the_batch(wan_files, tmp_path):
    def latents(name, **kw):
        cfg = wan_config(wan_files, tmp_path / name, vae=None, teacher=None, steps=(2,), dtype="float64", **kw)
        sample_model(cfg, TINY_WAN)
        return load_file(tmp_path / name / "latents.safetensors")["student-2-step"]

    one, again, batched = latents("a", batch=1), latents("b", batch=1), latents("c", batch=3)
    assert torch.equal(one, again)
    torch.testing.assert_close(batched, one, rtol=1e-6, atol=1e-6)  # float64 net: batch changes only rounding
    assert (one[0] - one[1]).abs().mean() > 0.1  # seeds 0 and 1 differ
    assert not list((tmp_path / "a").glob("*/*.mp4"))  # no VAE: latents only


@needs_codecs
def test_a_distributed_runs_ema_export_is_sampled_from_the_run_folder(wan_files, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(wan_files / "student.safetensors", run / "student_ema.safetensors")
    sample_model(wan_config(wan_files, tmp_path / "a", checkpoint=None, run=run, vae=None, teacher=None), TINY_WAN)
    sample_model(wan_config(wan_files, tmp_path / "b", vae=None, teacher=None), TINY_WAN)
    a, b = load_file(tmp_path / "a" / "latents.safetensors"), load_file(tmp_path / "b" / "latents.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_codecs
def test_one_step_student_is_the_rf_jump_of_the_raw_net(wan_files, tmp_path):
    """SPEC-rcm §6.1: x_r = eps / (cos t0 + sin t0), r = sin t0 / (sin t0 + cos t0), x0 = x_r - r v(x_r, 1000 r)."""
    cfg = wan_config(
        wan_files,
        tmp_path,
        vae=None,
        teacher=None,
        steps=(1,),
        seeds=(7,),
        prompts=("c a",),
        dtype="float64",
        sigma_max=30.0,
    )
    sample_model(cfg, TINY_WAN)
    got = load_file(tmp_path / "latents.safetensors")["student-1-step"]
    model = WanModel(WAN_TINY).double()
    model.load_state_dict(load_file(wan_files / "student.safetensors"))
    context = codecs.load_text_encoder(wan_files, dtype=torch.float64, max_length=16).encode(["c a"])
    eps = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float32).double()
    t0 = math.atan(30.0)
    r = math.sin(t0) / (math.sin(t0) + math.cos(t0))
    x_r = eps / (math.cos(t0) + math.sin(t0))
    with torch.no_grad():
        expected = x_r - r * model(x_r, torch.tensor([1000.0 * r], dtype=torch.float64), context)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cosmos-tiny", "cosmos-tiny-video"])
def test_cosmos_velocity_net_feeds_rf_time_not_1000_r(name):
    config = cosmos.CONFIGS[name]
    model = cosmos.random_cosmos(config, "cpu", torch.float64, seed=3)
    spec = dataclasses.replace(TINY_COSMOS, config=config)
    x, cond = torch.randn(2, 16, 2, 4, 6, dtype=torch.float64), torch.randn(2, 5, 24, dtype=torch.float64)
    r = torch.tensor([0.3, 0.8], dtype=torch.float64)
    params = dict(model.named_parameters())
    mask = {"condition_mask": torch.zeros(2, 1, 2, 4, 6, dtype=torch.float64)} if config.condition_mask else {}
    with torch.no_grad():
        torch.testing.assert_close(spec.velocity_net(model)(params, x, 1000 * r, cond), model(x, r, cond, **mask))


@needs_codecs
def test_cosmos_image_student_writes_pngs(wan_files, tmp_path):
    codecs.write_tiny_text_encoder(tmp_path / "t5", "t5", dim=24)
    model = cosmos.build_cosmos(TINY_COSMOS.config).to_empty(device="cpu")
    export_checkpoint(random_weights(model, 5), tmp_path / "cosmos.safetensors", TINY_COSMOS.key_maps["official"])
    cfg = wan_config(
        wan_files,
        tmp_path / "out",
        model="cosmos2b",
        checkpoint=tmp_path / "cosmos.safetensors",
        teacher=None,
        text_encoder=tmp_path / "t5",
        frames=1,
        height=32,
        width=48,
        seeds=(0,),
    )
    report = sample_model(cfg, TINY_COSMOS)
    pngs = sorted((tmp_path / "out").glob("*/*.png"))
    assert len(pngs) == 6 and media.read_image(pngs[0]).shape == (1, 32, 48, 3)
    assert list(report["rows"]) == ["student 1-step", "student 2-step", "student 4-step"]


@needs_codecs
@pytest.mark.parametrize("negative", [None, "", "x y"])
def test_cosmos_teacher_uncondition_is_zeros_unless_a_negative_prompt(wan_files, tmp_path, monkeypatch, negative):
    """The teacher rows' CFG uncondition follows prepare's rule: all zeros for Cosmos by default and for an
    empty negative prompt, the prompt's T5 embedding when one is given."""
    codecs.write_tiny_text_encoder(tmp_path / "t5", "t5", dim=24)
    model = cosmos.build_cosmos(TINY_COSMOS.config).to_empty(device="cpu")
    for name, seed in (("student", 5), ("teacher", 6)):
        path = tmp_path / f"{name}.safetensors"
        export_checkpoint(random_weights(model, seed), path, TINY_COSMOS.key_maps["official"])
    seen = []

    def teacher_sampler(denoise, params, noise, rf, cond, uncond, guidance):
        seen.append(uncond)
        return noise

    monkeypatch.setattr("entrypoints.sample.teacher_euler_sample", teacher_sampler)
    cfg = wan_config(
        wan_files,
        tmp_path / "out",
        model="cosmos2b",
        checkpoint=tmp_path / "student.safetensors",
        teacher=tmp_path / "teacher.safetensors",
        text_encoder=tmp_path / "t5",
        vae=None,
        negative_prompt=negative,
        steps=(1,),
        teacher_steps=2,
        frames=1,
        height=32,
        width=48,
        seeds=(0,),
    )
    sample_model(cfg, TINY_COSMOS)
    encoder = codecs.load_text_encoder(tmp_path / "t5", torch.device("cpu"), torch.float32, max_length=16)
    want = encoder.encode(["x y"]) if negative == "x y" else torch.zeros(1, 16, 24)
    assert seen and all(torch.equal(u, want.expand_as(u)) for u in seen)


@needs_codecs
@pytest.mark.parametrize(
    ("model", "mid_times", "sigma_max"),
    [
        ("wan1.3b", (1.5, 1.4, 1.0), 80.0),  # the official Wan inference script, both sizes
        ("wan14b", (1.5, 1.4, 1.0), 80.0),
        ("cosmos2b", (1.3, 1.0, 0.6), 80.0),  # the paper's grid and the Cosmos distilled sampler
        ("cosmos14b", (1.3, 1.0, 0.6), 800.0),
        ("cosmos2b-video", (1.3, 1.0, 0.6), 80.0),  # no preset: the paper's grid
    ],
)
def test_student_grid_defaults_to_the_models_mid_times(wan_files, tmp_path, monkeypatch, model, mid_times, sigma_max):
    """Without --mid-times / --sigma-max the 4-step grid is [atan sigma_max, the model's mid times, 0];
    --mid-times still overrides it."""
    family = "wan" if model.startswith("wan") else "cosmos"
    spec = TINY_WAN if family == "wan" else TINY_COSMOS
    if model == "cosmos2b-video":
        spec = dataclasses.replace(spec, config=cosmos.CONFIGS["cosmos-tiny-video"])
    encoder = wan_files
    if family == "cosmos":
        encoder = tmp_path / "t5"
        codecs.write_tiny_text_encoder(encoder, "t5", dim=24)
    module = WanModel(WAN_TINY) if family == "wan" else cosmos.build_cosmos(spec.config).to_empty(device="cpu")
    export_checkpoint(random_weights(module, 3), tmp_path / "student.safetensors", spec.key_maps["official"])
    grids = []

    def student_sampler(denoise, params, noise, times, cond):
        grids.append(times)
        return noise[0]

    monkeypatch.setattr("entrypoints.sample.consistency_sample", student_sampler)
    base = dict(model=model, checkpoint=tmp_path / "student.safetensors", teacher=None, vae=None, text_encoder=encoder)
    base |= dict(steps=(4,), seeds=(0,), prompts=("a b",), frames=5 if family == "wan" else 1, height=32, width=48)
    sample_model(wan_config(wan_files, tmp_path / "out", **base), spec)
    want = torch.tensor([math.atan(sigma_max), *mid_times, 0.0], dtype=torch.float64)
    assert len(grids) == 2 and all(torch.equal(g, want) for g in grids)  # warm-up call and timed call
    grids.clear()
    sample_model(wan_config(wan_files, tmp_path / "out", **base, mid_times=(1.2, 0.9, 0.5), sigma_max=5.0), spec)
    assert torch.equal(grids[-1], torch.tensor([math.atan(5.0), 1.2, 0.9, 0.5, 0.0], dtype=torch.float64))


@needs_codecs
def test_bad_inputs_are_reported_clearly(wan_files, tmp_path):
    shutil.copytree(wan_files / "text_encoder", tmp_path / "solo")  # an encoder without its tokenizer
    cases = [
        (dict(text_encoder=tmp_path / "solo"), FileNotFoundError, "no usable tokenizer in"),
        (dict(text_encoder=tmp_path / "nope"), FileNotFoundError, "text encoder weights not found.*--text-encoder"),
        (dict(text_encoder=None), FileNotFoundError, "no text encoder given"),
        (dict(vae=tmp_path), FileNotFoundError, "VAE weights not found.*no config.json"),
        (dict(teacher=tmp_path / "t.safetensors"), FileNotFoundError, "teacher checkpoint not found"),
        (dict(checkpoint=tmp_path / "s.safetensors"), FileNotFoundError, "student checkpoint not found"),
        (dict(checkpoint=None), ValueError, "no student: pass --run"),
        (dict(prompts=("a " * 20,)), codecs.PromptTooLongError, r"prompt 0 \(21 tokens\)"),
        (dict(prompts=()), ValueError, "no prompts"),
        (dict(frames=6), ValueError, r"frames must be 1 \+ 4 k"),
        (dict(height=36), ValueError, "multiples of 8"),
        (dict(layout="comfy"), ValueError, "unknown --layout 'comfy'"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            sample_model(wan_config(wan_files, tmp_path / "out", **overrides), TINY_WAN)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*and no student_ema.safetensors"):
        sample_model(wan_config(wan_files, tmp_path / "out", checkpoint=None, run=tmp_path), TINY_WAN)
    with pytest.raises(ValueError, match="text encoder width 24 != wan1.3b's text width 32"):
        sample_model(wan_config(wan_files, tmp_path / "out"), dataclasses.replace(TINY_WAN, text_dim=32))
    bad_teacher = tmp_path / "bad.safetensors"
    export_checkpoint({"blocks.0.ffn.0.weight": torch.ones(2, 2)}, bad_teacher, TINY_WAN.key_maps["official"])
    with pytest.raises(CheckpointMismatchError, match="missing"):
        sample_model(wan_config(wan_files, tmp_path / "out", teacher=bad_teacher), TINY_WAN)
    assert not (tmp_path / "out" / "latents.safetensors").exists()


def test_no_strict_loads_a_student_with_junk_and_a_missing_key_and_says_so(tmp_path, capsys):
    """A file with an unknown tensor and without one bias: the default refuses it naming both;
    --no-strict loads every tensor it has, starts the bias at 0 and prints the report."""
    weights = random_weights(WanModel(WAN_TINY), seed=4)
    missing = "blocks.0.ffn.0.bias"
    kept = {name: tensor for name, tensor in weights.items() if name != missing}
    path = tmp_path / "student.safetensors"
    export_checkpoint(kept | {"blocks.0.lora_A.weight": torch.ones(2, 2)}, path, TINY_WAN.key_maps["official"])
    cfg = SampleConfig(model="wan1.3b", dtype="float32", device="cpu")
    with pytest.raises(CheckpointMismatchError, match=f"(?s)missing.*{missing}.*unexpected.*lora_A"):
        load_denoiser(TINY_WAN, path, False, cfg, torch.device("cpu"))
    loose = dataclasses.replace(cfg, strict=False)
    _, params = load_denoiser(TINY_WAN, path, False, loose, torch.device("cpu"))
    assert torch.equal(params[missing], torch.zeros_like(weights[missing]))
    assert all(torch.equal(params[name], tensor) for name, tensor in kept.items())
    printed = capsys.readouterr().out
    assert "non-strict load" in printed and "lora_A" in printed and "initialised fresh" in printed


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"steps must lie in 1..4"):
        SampleConfig(steps=(5,))
    with pytest.raises(ValueError, match=r"steps must lie in 1..2"):
        SampleConfig(steps=(3,), mid_times=(1.3,))
    with pytest.raises(ValueError, match="either --run or --checkpoint"):
        SampleConfig(run=Path("a"), checkpoint=Path("b"))
    with pytest.raises(ValueError, match="batch must be >= 1"):
        SampleConfig(batch=0)
    with pytest.raises(ValueError, match="unknown model 'sdxl'"):
        SampleConfig(model="sdxl")
    for bad in (0.5, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="--guidance: guidance scale must be finite and >= 1"):
            SampleConfig(guidance=bad)
    for bad in (0.0, -80.0, float("nan")):  # 0 used to become the default 80 without a word
        with pytest.raises(ValueError, match="sigma_max must be finite and > 0"):
            SampleConfig(sigma_max=bad)
    with pytest.raises(ValueError, match="shift must be finite and > 0"):
        SampleConfig(shift=0.0)


def test_cli_flags_match_snapshot():
    """The CLI changes only on purpose: update FLAGS with the change."""
    flags = cli_flags("entrypoints.sample")
    assert flags == sorted(FLAGS), "\n".join(flags)
