"""entrypoints.prepare: toy mixture shards, captioned media -> shards through tiny random codecs (no
downloads), skip-and-report of unfit inputs, resume after an interruption, input lists, CLI snapshot."""

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints import prepare
from entrypoints.prepare import PrepareConfig, list_inputs, prepare_media, prepare_toy
from entrypoints.toy import ToyConfig
from rcmfn import codecs, media
from rcmfn.models import cosmos
from rcmfn.models.registry import get_spec
from rcmfn.models.wan import WAN_TINY
from rcmfn.shards import ShardLoader, read_manifest, read_negative_embedding, read_uncondition
from rcmfn.toy import gmm
from tests.conftest import cli_flags

# The registered Cosmos spec with a tiny architecture: single 16 x 16 images, 16 text tokens of width 24.
TINY_COSMOS = dataclasses.replace(
    get_spec("cosmos2b"), config=cosmos.CONFIGS["cosmos-tiny"], latent_shape=(16, 1, 2, 2), text_len=16, text_dim=24
)
# The registered Wan spec with a tiny architecture: 5 frames of 16 x 16 pixels, 16 text tokens of width 24.
TINY_WAN = dataclasses.replace(
    get_spec("wan1.3b"),
    config=WAN_TINY,
    latent_shape=(16, 2, 2, 2),
    text_len=16,
    text_dim=24,
)
FLAGS = """--batch --count --device --dtype --fit --frame-stride --frames --from-teacher --guidance --height --help
--image-encoder --input --mixture.channels --mixture.class-norm --mixture.frames --mixture.height --mixture.mode-offset
--mixture.modes-per-class --mixture.num-classes --mixture.seed --mixture.std-range --mixture.text-dim
--mixture.text-tokens --mixture.weight-ratio --mixture.width --model --negative-prompt --no-from-teacher
--no-overwrite --no-progress --no-random-teacher --no-truncate-prompts --output --overwrite --progress --prompt-file
--random-teacher --seed --shard-size --shift --sigma-max --steps --teacher --teacher-dtype --teacher-layout
--teacher-model --text-encoder --truncate-prompts --vae --width""".split()


def shard_tensors(folder: Path, key: str) -> torch.Tensor:
    return torch.cat([load_file(folder / s.file)[key] for s in read_manifest(folder).shards])


def shard_prompts(folder: Path) -> list[str]:
    return [p for s in read_manifest(folder).shards for p in json.loads((folder / s.prompts).read_text())]


def toy_config(output: Path, **overrides) -> PrepareConfig:
    return PrepareConfig(**({"output": output, "count": 10, "shard_size": 4, "progress": False} | overrides))


def test_toy_shards_hold_mixture_samples_with_their_class_embeddings(tmp_path):
    result = prepare_toy(toy_config(tmp_path))
    manifest = read_manifest(tmp_path)
    assert result["written"] == 10 and [s.count for s in manifest.shards] == [4, 4, 2]
    assert manifest.latent_shape == (4, 1, 8, 8) and manifest.text_shape == (8, 32) and manifest.dtype == "float32"
    mixture = gmm.build_mixture(ToyConfig().mixture)  # the distill toy's mixture is the default
    labels = torch.tensor([int(p.removeprefix("class ")) for p in shard_prompts(tmp_path)])
    texts = shard_tensors(tmp_path, "text_embeddings")
    assert torch.equal(texts, gmm.class_embeddings(mixture, labels).float())
    assert torch.equal(read_negative_embedding(tmp_path), mixture.null_text.float())
    x0 = shard_tensors(tmp_path, "latents").double()
    mode = gmm.assign_modes(mixture, x0, labels)  # each sample sits in one of its own class's modes
    mu, s = mixture.means.reshape(-1, mixture.dim)[mode], mixture.stds.reshape(-1)[mode]
    spread = (x0.reshape(10, -1) - mu).square().mean(-1) / s.square()
    assert (mode // mixture.modes_per_class).equal(labels) and spread.min() > 0.5 and spread.max() < 1.6
    batch = next(ShardLoader(tmp_path, batch_size=3, rank=0, world=1))
    assert batch.latents.shape == (3, 4, 1, 8, 8) and all(p.startswith("class ") for p in batch.prompts)


def test_toy_resume_after_an_interruption_equals_a_straight_run(tmp_path, monkeypatch):
    prepare_toy(toy_config(tmp_path / "straight", count=13))
    real, calls = gmm.sample_mixture, []

    def crash_on_the_seventh(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gmm, "sample_mixture", crash_on_the_seventh)
    with pytest.raises(KeyboardInterrupt):
        prepare_toy(toy_config(tmp_path / "resumed"))
    monkeypatch.setattr(gmm, "sample_mixture", real)
    assert read_manifest(tmp_path / "resumed").count == 4  # the complete shard only
    assert prepare_toy(toy_config(tmp_path / "resumed"))["written"] == 6
    assert prepare_toy(toy_config(tmp_path / "resumed", count=13))["written"] == 3
    for key in ("latents", "text_embeddings"):
        assert torch.equal(shard_tensors(tmp_path / "resumed", key), shard_tensors(tmp_path / "straight", key))
    assert shard_prompts(tmp_path / "resumed") == shard_prompts(tmp_path / "straight")


def test_toy_cli_reports_what_it_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sys, "argv", ["prepare", "--output", str(tmp_path), "--count", "5", "--shard-size", "2", "--no-progress"]
    )
    prepare.main()
    assert "5 samples written now, 5 in 3 shards; latent [4, 1, 8, 8], text [8, 32], float32" in capsys.readouterr().out


def test_toy_refuses_to_mix_another_mixture_or_seed_into_a_folder(tmp_path):
    prepare_toy(toy_config(tmp_path, count=2))
    with pytest.raises(ValueError, match="another mixture or seed"):
        prepare_toy(toy_config(tmp_path, seed=1))
    with pytest.raises(ValueError, match="another mixture or seed"):
        prepare_toy(toy_config(tmp_path, mixture=gmm.MixtureConfig(num_classes=3)))


def test_input_lists_resolve_paths_and_name_bad_records(tmp_path):
    (tmp_path / "list.csv").write_text('path,caption\nclips/a.mp4,"a, b"\n/abs/b.png,w1\n')
    (tmp_path / "list.jsonl").write_text('{"path": "a.mp4", "caption": "x"}\n\n{"path": "b.png", "caption": "y"}\n')
    assert list_inputs(tmp_path / "list.csv") == [
        ("0:clips/a.mp4", tmp_path / "clips/a.mp4", "a, b"),
        ("1:/abs/b.png", Path("/abs/b.png"), "w1"),
    ]
    assert [caption for _, _, caption in list_inputs(tmp_path / "list.jsonl")] == ["x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"file": "a.mp4"}\n')
    with pytest.raises(ValueError, match="record 0 needs 'path' and 'caption'"):
        list_inputs(tmp_path / "bad.jsonl")
    (tmp_path / "list.txt").write_text("a.mp4\n")
    with pytest.raises(ValueError, match="a folder, a .csv or a .jsonl"):
        list_inputs(tmp_path / "list.txt")
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_inputs(tmp_path / "missing.csv")


needs_codecs = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("transformers", "diffusers", "av")),
    reason="text encoder / VAE / video tests need the media extra (pip install 'rcmfn[media]')",
)


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    if any(importlib.util.find_spec(m) is None for m in ("transformers", "diffusers", "av")):
        pytest.skip("needs the media extra (transformers, diffusers, av)")
    root = tmp_path_factory.mktemp("codecs")
    codecs.write_tiny_text_encoder(root, "umt5", dim=24)
    codecs.write_tiny_vae(root)
    return root


def clip(t: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random colour ramps (video-codec friendly), uint8 [t, h, w, 3]."""
    gen = torch.Generator().manual_seed(seed)
    corners = torch.rand(t, 3, 2, 2, generator=gen) * 255
    return (
        torch.nn.functional.interpolate(corners, size=(h, w), mode="bilinear")
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .contiguous()
    )


def media_folder(root: Path) -> Path:
    """Two usable clips among five that must be skipped, each for its own reason."""
    root.mkdir()
    entries = {
        "good": (clip(6, 16, 16, 0), "a b c"),
        "big": (clip(5, 20, 32, 1), "w1 w2"),
        "short": (clip(3, 16, 16, 2), "a"),
        "long": (clip(5, 16, 16, 3), "a " * 20),
        "nocap": (clip(5, 16, 16, 4), None),
        "blank": (clip(5, 16, 16, 6), " \n\t"),  # an empty caption is as good as none: skipped, reported
    }
    for name, (frames, caption) in entries.items():
        media.write_mp4(root / f"{name}.mp4", frames)
        if caption is not None:
            (root / f"{name}.txt").write_text(caption)
    media.write_png(root / "still.png", clip(1, 16, 16, 5))
    (root / "still.txt").write_text("a")
    (root / "broken.mp4").write_bytes(b"\x00not a video" * 10)
    (root / "broken.txt").write_text("b")
    return root


def media_config(codec_dir: Path, source: Path, output: Path, **overrides) -> PrepareConfig:
    base = dict(
        output=output,
        model="wan1.3b",
        input=source,
        text_encoder=codec_dir,
        vae=codec_dir,
        negative_prompt="x y",
        shard_size=1,
        device="cpu",
        progress=False,
    )
    return PrepareConfig(**(base | overrides))


@needs_codecs
def test_media_become_shards_and_unfit_inputs_are_skipped_with_reasons(codec_dir, tmp_path):
    source = media_folder(tmp_path / "in")
    result = prepare_media(media_config(codec_dir, source, tmp_path / "out"), TINY_WAN)
    assert result["written"] == 2 and result["total"] == 2
    reasons = {
        "short.mp4": "3 frames, need 5",
        "still.png": "1 frames, need 5",
        "broken.mp4": "unreadable video",
        "nocap.mp4": "no caption",
        "blank.mp4": "empty caption",
        "long.mp4": r"caption 0 \(21 tokens\)",
    }
    assert sorted(result["skipped"]) == sorted(reasons)
    for key, pattern in reasons.items():
        assert re.search(pattern, result["skipped"][key]), result["skipped"][key]
    manifest = read_manifest(tmp_path / "out")
    assert manifest.latent_shape == (16, 2, 2, 2) and manifest.text_shape == (16, 24) and manifest.dtype == "bfloat16"
    assert shard_prompts(tmp_path / "out") == ["w1 w2", "a b c"]  # sorted input order: big, good
    vae, encoder = codecs.load_vae(codec_dir), codecs.load_text_encoder(codec_dir, max_length=16)
    expected = vae.encode(media.to_pixels(media.read_video(source / "good.mp4")[:5])[None])[0]
    assert torch.equal(shard_tensors(tmp_path / "out", "latents")[1], expected.to(torch.bfloat16))
    text = shard_tensors(tmp_path / "out", "text_embeddings")[1]
    assert torch.equal(text, encoder.encode(["a b c"])[0].float().to(torch.bfloat16))
    assert text[4:].abs().max() == 0 and text[:4].abs().min() > 0  # 3 words + </s>, then zero rows
    negative = read_negative_embedding(tmp_path / "out")
    assert torch.equal(negative, encoder.encode(["x y"])[0].float().to(torch.bfloat16))

    again = prepare_media(media_config(codec_dir, source, tmp_path / "out"), TINY_WAN)
    assert again["written"] == 0 and again["skipped"] == {} and again["previously_skipped"] == 6
    media.write_mp4(source / "new.mp4", clip(5, 16, 16, 6))
    (source / "new.txt").write_text("w9")
    assert prepare_media(media_config(codec_dir, source, tmp_path / "out"), TINY_WAN)["total"] == 3


@needs_codecs
def test_cosmos_uncondition_is_zeros_unless_a_negative_prompt_is_given(codec_dir, tmp_path):
    """The manifest records CFG's unconditional input: all zeros for Cosmos by default and for an empty
    negative prompt (no embedding stored), the prompt's T5 embedding when one is given."""
    codecs.write_tiny_text_encoder(tmp_path / "t5", "t5", dim=24)
    source = media_folder(tmp_path / "in")
    encoder = codecs.load_text_encoder(tmp_path / "t5", max_length=16)
    for name, negative in (("default", None), ("empty", ""), ("given", "x y")):
        out = tmp_path / name
        cfg = media_config(codec_dir, source, out, model="cosmos2b", text_encoder=tmp_path / "t5", frames=1)
        result = prepare_media(dataclasses.replace(cfg, negative_prompt=negative), TINY_COSMOS)
        manifest = read_manifest(out)
        assert result["total"] > 0 and manifest.latent_shape == (16, 1, 2, 2)
        if negative == "x y":
            assert manifest.uncondition == "negative_prompt"
            assert torch.equal(read_uncondition(out), encoder.encode(["x y"])[0].float().to(torch.bfloat16))
        else:
            assert manifest.uncondition == "zeros" and read_negative_embedding(out) is None
            assert torch.equal(read_uncondition(out), torch.zeros(16, 24, dtype=torch.bfloat16))


@needs_codecs
def test_media_resume_after_an_interruption_equals_a_straight_run(codec_dir, tmp_path, monkeypatch):
    source = media_folder(tmp_path / "in")
    prepare_media(media_config(codec_dir, source, tmp_path / "straight"), TINY_WAN)
    real, calls = media.read_media, []

    def crash_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(media, "read_media", crash_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_media(media_config(codec_dir, source, tmp_path / "resumed"), TINY_WAN)
    monkeypatch.setattr(media, "read_media", real)
    assert read_manifest(tmp_path / "resumed").count == 1
    assert prepare_media(media_config(codec_dir, source, tmp_path / "resumed"), TINY_WAN)["written"] == 1
    for key in ("latents", "text_embeddings"):
        assert torch.equal(shard_tensors(tmp_path / "resumed", key), shard_tensors(tmp_path / "straight", key))
    progress = json.loads((tmp_path / "resumed" / prepare.PROGRESS).read_text())
    assert progress["shards"] == [["big.mp4"], ["good.mp4"]] and len(progress["skipped"]) == 6


@needs_codecs
def test_csv_list_with_exact_sizes_skips_media_of_another_size(codec_dir, tmp_path):
    source = media_folder(tmp_path / "in")
    (tmp_path / "list.csv").write_text("path,caption\nin/good.mp4,a b c\nin/big.mp4,w1 w2\n")
    result = prepare_media(
        media_config(codec_dir, tmp_path / "list.csv", tmp_path / "out", fit="exact", truncate_prompts=True), TINY_WAN
    )
    assert result["written"] == 1 and list(result["skipped"]) == ["1:in/big.mp4"]
    assert "size 20 x 32 (H x W), need 16 x 16" in result["skipped"]["1:in/big.mp4"]
    assert source.is_dir()


@needs_codecs
def test_missing_weights_or_input_fail_before_anything_is_written(codec_dir, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    with pytest.raises(FileNotFoundError, match="VAE weights not found"):
        prepare_media(media_config(codec_dir, source, tmp_path / "out", vae=tmp_path / "none"), TINY_WAN)
    with pytest.raises(FileNotFoundError, match="no text encoder given"):
        prepare_media(media_config(codec_dir, source, tmp_path / "out", text_encoder=None), TINY_WAN)
    with pytest.raises(ValueError, match="needs --input"):
        prepare_media(media_config(codec_dir, None, tmp_path / "out"), TINY_WAN)
    with pytest.raises(codecs.PromptTooLongError, match="negative prompt"):
        prepare_media(media_config(codec_dir, source, tmp_path / "out", negative_prompt=None), TINY_WAN)
    assert not (tmp_path / "out" / "shard-00000.safetensors").exists()
    with pytest.raises(ValueError, match="unknown model"):
        PrepareConfig(model="sd3")
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        PrepareConfig(shard_size=0)


def test_cli_flags_match_snapshot():
    """The CLI changes only on purpose: update FLAGS with the change."""
    flags = cli_flags("entrypoints.prepare")
    assert flags == sorted(FLAGS), "\n".join(flags)
