"""entrypoints.prepare --from-teacher (entrypoints/teacher_data.py): shards of a tiny random Wan / Cosmos
teacher's Euler + CFG samples through a tiny random text encoder (no downloads): what a shard holds, that
distill's loader reads it, bit-identical resume after an interruption and after damage, two ranks = one
rank (in one process and as two gloo processes), the settings record, and the named errors."""

import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from entrypoints import prepare, teacher_data, teacher_load
from entrypoints.prepare import PrepareConfig, prepare_toy
from entrypoints.sample import SampleConfig, load_denoiser
from entrypoints.teacher_data import finish_output, open_output, prepare_from_teacher, write_rank_shards
from entrypoints.teacher_data_config import TeacherDataConfig
from rcmfn import codecs
from rcmfn.checksums import file_digest
from rcmfn.models.checkpoint import CheckpointMismatchError, export_checkpoint
from rcmfn.models.cosmos import CosmosDiT
from rcmfn.models.wan import WanModel
from rcmfn.samplers import teacher_euler_sample, teacher_rf_times
from rcmfn.shards import ShardLoader, read_manifest, read_uncondition
from tests.entrypoints.test_prepare import TINY_COSMOS, TINY_WAN
from tests.entrypoints.test_sample import random_weights
from tests.parallel.parallel_harness import free_port

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("transformers", "tokenizers")),
    reason="the text encoder needs the media extra (pip install 'rcmfn[media]')",
)
# Words of the tiny tokenizer's vocabulary (a-z, w0..w99); 7 prompts in shards of 2: 2 + 2 + 2 + 1.
PROMPTS = ["a b c", "w1 w2", "d e f g", "w3", "h i", "w4 w5 w6", "j k l"]
LATENT = (16, 2, 2, 2)
# A bigger teacher for TINY_WAN's data, as the official runs use the 14B's samples for the 1.3B.
DEEP = dataclasses.replace(TINY_WAN.config, num_layers=3)
DEEP_WAN = dataclasses.replace(TINY_WAN, config=DEEP)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the gloo workers use: bit equality across processes needs one thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Tiny umT5 / T5 encoders, random-weight Wan and Cosmos teachers, the prompt file."""
    root = tmp_path_factory.mktemp("teacher")
    codecs.write_tiny_text_encoder(root, "umt5", dim=24)
    codecs.write_tiny_text_encoder(root / "t5", "t5", dim=24)
    export_checkpoint(
        random_weights(WanModel(TINY_WAN.config), 1), root / "wan.safetensors", TINY_WAN.key_maps["official"]
    )
    export_checkpoint(random_weights(WanModel(DEEP), 4), root / "deep.safetensors", DEEP_WAN.key_maps["official"])
    cosmos = random_weights(CosmosDiT(TINY_COSMOS.config), 2)
    export_checkpoint(cosmos, root / "cosmos.safetensors", TINY_COSMOS.key_maps["official"])
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:3] + ["", "  "] + PROMPTS[3:]) + "\n")
    return root


def config(files: Path, output: Path, **teacher) -> PrepareConfig:
    settings = dict(from_teacher=True, teacher=files / "wan.safetensors", prompt_file=files / "prompts.txt")
    settings |= dict(steps=3, teacher_dtype="float32", batch=2)
    base = dict(model="wan1.3b", output=output, text_encoder=files, negative_prompt="x y", shard_size=2, seed=3)
    return PrepareConfig(**base, device="cpu", progress=False, teacher_data=TeacherDataConfig(**(settings | teacher)))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a dataset folder (not the lock, not temporaries), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory) -> Path:
    """One uninterrupted single-process run: the reference every other run must equal bit for bit."""
    out = tmp_path_factory.mktemp("straight")
    result = prepare_from_teacher(config(files, out), TINY_WAN)
    assert (result["written"], result["skipped_shards"], result["shards"]) == (7, 0, 4)
    return out


def test_shards_hold_the_teachers_cfg_samples_and_distill_reads_them(files, straight):
    manifest = read_manifest(straight)
    assert [s.count for s in manifest.shards] == [2, 2, 2, 1] and manifest.dtype == "bfloat16"
    assert manifest.latent_shape == LATENT and manifest.text_shape == (16, 24)
    shards = [load_file(straight / s.file) for s in manifest.shards]
    latents = torch.cat([s["latents"] for s in shards])
    texts = torch.cat([s["text_embeddings"] for s in shards])
    sidecars = [p for s in manifest.shards for p in json.loads((straight / s.prompts).read_text())]
    assert sidecars == PROMPTS  # blank lines skipped, file order, no gaps, no duplicates
    encoder = codecs.load_text_encoder(files, max_length=16)
    assert torch.equal(texts, torch.stack([encoder.encode([p])[0].float() for p in PROMPTS]).to(torch.bfloat16))
    negative = encoder.encode(["x y"])[0].float().to(torch.bfloat16)
    assert manifest.uncondition == "negative_prompt" and torch.equal(read_uncondition(straight), negative)
    # The same samples from the sampler called directly: preset guidance 5, shift 5, sigma_max 80, noise of
    # (seed 3, prompt i), the stored embedding and uncondition, batches [0, 1], [2, 3], [4, 5], [6].
    loader_cfg = SampleConfig(model="wan1.3b", dtype="float32")
    denoise, params = load_denoiser(TINY_WAN, files / "wan.safetensors", False, loader_cfg, "cpu")
    rf = teacher_rf_times(3, 5.0, 80.0)
    expected = []
    for chunk in (range(0, 2), range(2, 4), range(4, 6), range(6, 7)):
        cond, uncond = texts[chunk.start : chunk.stop], negative.expand(len(chunk), -1, -1)
        noise = torch.stack(
            [torch.randn(LATENT, generator=torch.Generator().manual_seed(3_000_009 + i)) for i in chunk]
        )
        expected.append(teacher_euler_sample(denoise, params, noise, rf, cond, uncond, 5.0).to(torch.bfloat16))
    assert torch.equal(latents, torch.cat(expected))
    assert latents.float().std() > 0.1 and (latents[0] - latents[1]).abs().mean() > 0.01  # no zeros, no repeats
    batch = next(ShardLoader(straight, batch_size=3, rank=0, world=1, seed=0))
    assert batch.latents.shape == (3, *LATENT) and set(batch.prompts) <= set(PROMPTS)


def test_teacher_json_records_checkpoint_sampler_seed_and_uncondition(files, straight):
    saved = json.loads((straight / "teacher.json").read_text())
    digest = file_digest(files / "wan.safetensors")
    assert saved["teacher"] == {"model": "wan1.3b", "sha256": digest, "random_init": False}
    assert saved["teacher_layout"] == "official" and saved["teacher_dtype"] == "float32"
    assert saved["paths"]["teacher"] == str(files / "wan.safetensors")
    assert saved["sampler"] == {"name": "euler", "steps": 3, "guidance": 5.0, "shift": 5.0, "sigma_max": 80.0}
    assert (saved["seed"], saved["uncondition"], saved["negative_prompt"]) == (3, "negative_prompt", "x y")
    assert saved["prompts"]["sha256"] == file_digest(files / "prompts.txt")


def test_resume_after_an_interruption_and_damage_writes_the_same_bits(files, straight, tmp_path, monkeypatch):
    real, calls = teacher_load.teacher_euler_sample, []

    def interrupt_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(teacher_load, "teacher_euler_sample", interrupt_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_from_teacher(config(files, tmp_path), TINY_WAN)
    assert sorted(p.name for p in tmp_path.glob("*.record.json")) == [
        "shard-00000.record.json",
        "shard-00001.record.json",
    ]
    assert read_manifest(tmp_path).count == 0  # the manifest lists shards only once all are written
    # Poison: shard 1 damaged after its record, shard 2 half-written (a file, no record).
    damaged = bytearray((tmp_path / "shard-00001.safetensors").read_bytes())
    damaged[-3] ^= 0xFF
    (tmp_path / "shard-00001.safetensors").write_bytes(bytes(damaged))
    (tmp_path / "shard-00002.safetensors").write_bytes(b"\x00half a shard" * 7)
    calls.clear()
    monkeypatch.setattr(teacher_load, "teacher_euler_sample", lambda *a: calls.append(1) or real(*a))
    result = prepare_from_teacher(config(files, tmp_path), TINY_WAN)
    assert (result["skipped_shards"], result["written"], len(calls)) == (1, 5, 3)  # shards 1, 2, 3 redone
    assert folder_bytes(tmp_path) == folder_bytes(straight)
    again = prepare_from_teacher(config(files, tmp_path), TINY_WAN)
    assert (again["written"], again["skipped_shards"], len(calls)) == (0, 4, 3)  # nothing left: no teacher call


def test_two_ranks_write_what_one_rank_writes(files, straight, tmp_path):
    """The per-rank function as torchrun's ranks call it, rank 1 first: the same files, bit for bit."""
    cfg = config(files, tmp_path)
    encoder = codecs.load_text_encoder(files, "cpu", torch.bfloat16, 16)
    with contextlib.ExitStack() as held:
        open_output(cfg, TINY_WAN, encoder, held)
        one = write_rank_shards(cfg, TINY_WAN, PROMPTS, encoder, 1, 2, torch.device("cpu"))
        zero = write_rank_shards(cfg, TINY_WAN, PROMPTS, encoder, 0, 2, torch.device("cpu"))
        finish_output(cfg, len(PROMPTS))
    assert (one["shards"], one["written"], zero["shards"], zero["written"]) == (2, 3, 2, 4)  # shards 1, 3 / 0, 2
    assert folder_bytes(tmp_path) == folder_bytes(straight)


def _gloo_rank(rank: int, world: int, port: int, files: Path, output: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    prepare_from_teacher(config(files, output), TINY_WAN)


def test_two_gloo_processes_write_what_one_process_writes(files, straight, tmp_path, monkeypatch):
    """torchrun's path: rank 0 here, rank 1 spawned; a gloo group, rank 0's folder setup and manifest."""
    port = free_port()
    child = mp.get_context("spawn").Process(target=_gloo_rank, args=(1, 2, port, files, tmp_path))
    child.start()
    try:
        env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        result = prepare_from_teacher(config(files, tmp_path), TINY_WAN)
    finally:
        child.join(timeout=120)
        if child.exitcode is None:  # rank 0 failed before the group formed: rank 1 waits for it forever
            child.kill()
            child.join()
    assert child.exitcode == 0 and (result["shards"], result["written"]) == (2, 4)
    assert folder_bytes(tmp_path) == folder_bytes(straight)


def test_cosmos_samples_with_the_zero_uncondition_and_random_teacher_runs(files, tmp_path):
    cfg = config(files, tmp_path / "c", teacher=files / "cosmos.safetensors", batch=1)
    cfg = dataclasses.replace(cfg, model="cosmos2b", text_encoder=files / "t5", negative_prompt=None, frames=1)
    prepare_from_teacher(cfg, TINY_COSMOS)
    manifest = read_manifest(tmp_path / "c")
    saved = json.loads((tmp_path / "c" / "teacher.json").read_text())
    assert manifest.uncondition == "zeros" and (saved["uncondition"], saved["negative_prompt"]) == ("zeros", None)
    assert saved["sampler"]["guidance"] == 4.5  # the cosmos2b preset's standard weight
    text = load_file(tmp_path / "c" / "shard-00000.safetensors")["text_embeddings"][:1]
    loader_cfg = SampleConfig(model="cosmos2b", dtype="float32")
    denoise, params = load_denoiser(TINY_COSMOS, files / "cosmos.safetensors", False, loader_cfg, "cpu")
    noise = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(3_000_009))  # 3 * 1_000_003 + 0
    x0 = teacher_euler_sample(denoise, params, noise, teacher_rf_times(3, 5.0, 80.0), text, torch.zeros_like(text), 4.5)
    assert torch.equal(load_file(tmp_path / "c" / "shard-00000.safetensors")["latents"][:1], x0.to(torch.bfloat16))
    random = config(files, tmp_path / "r", teacher=None, random_teacher=True, steps=1)
    assert prepare_from_teacher(random, TINY_WAN)["manifest"].count == 7
    assert json.loads((tmp_path / "r" / "teacher.json").read_text())["teacher"]["random_init"] is True


def test_a_bigger_teacher_samples_data_of_the_models_shape(files, tmp_path, monkeypatch):
    """--model wan1.3b --teacher-model wan14b, the official 1.3B run's data: the data keep --model's shape."""
    for module in (teacher_data, teacher_load):
        monkeypatch.setattr(module, "get_spec", lambda name: {"wan14b": DEEP_WAN}[name])
    with pytest.raises(CheckpointMismatchError, match="unexpected"):  # the 14B file does not fit the 1.3B net
        prepare_from_teacher(config(files, tmp_path / "a", teacher=files / "deep.safetensors"), TINY_WAN)
    cfg = config(files, tmp_path / "b", teacher=files / "deep.safetensors", teacher_model="wan14b", steps=1)
    prepare_from_teacher(cfg, TINY_WAN)
    assert read_manifest(tmp_path / "b").latent_shape == LATENT
    assert json.loads((tmp_path / "b" / "teacher.json").read_text())["teacher"]["model"] == "wan14b"
    shard = load_file(tmp_path / "b" / "shard-00000.safetensors")
    denoise, params = load_denoiser(DEEP_WAN, files / "deep.safetensors", False, SampleConfig(dtype="float32"), "cpu")
    noise = torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(3_000_009 + i)) for i in (0, 1)])
    cond, uncond = shard["text_embeddings"], read_uncondition(tmp_path / "b").expand(2, -1, -1)
    x0 = teacher_euler_sample(denoise, params, noise, teacher_rf_times(1, 5.0, 80.0), cond, uncond, 5.0)
    assert torch.equal(shard["latents"], x0.to(torch.bfloat16))


def test_missing_inputs_and_a_mismatched_teacher_are_named_before_any_shard(files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        prepare_from_teacher(config(files, out, prompt_file=tmp_path / "none.txt"), TINY_WAN)
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        prepare_from_teacher(config(files, out, prompt_file=tmp_path / "blank.txt"), TINY_WAN)
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        prepare_from_teacher(config(files, out, teacher=tmp_path / "none.safetensors"), TINY_WAN)
    (tmp_path / "long.txt").write_text("a b\n" + "a " * 20 + "\n")
    with pytest.raises(codecs.PromptTooLongError, match="prompt 1 \\(21 tokens\\)"):
        prepare_from_teacher(config(files, out, prompt_file=tmp_path / "long.txt"), TINY_WAN)
    with pytest.raises(CheckpointMismatchError, match="missing"):
        prepare_from_teacher(config(files, out, teacher=files / "cosmos.safetensors"), TINY_WAN)
    assert not list(out.glob("shard-*"))
    # No shard was written under the wrong teacher's settings: the right one takes the folder without asking.
    assert prepare_from_teacher(config(files, out, steps=1), TINY_WAN)["manifest"].count == 7


def test_a_folder_of_other_settings_or_another_dataset_is_refused_unless_overwrite(files, straight, tmp_path):
    out = tmp_path / "out"
    prepare_from_teacher(config(files, out, steps=1), TINY_WAN)
    with pytest.raises(ValueError, match=r"other settings \(sampler.steps: 1 vs now 2\).*--overwrite"):
        prepare_from_teacher(config(files, out, steps=2), TINY_WAN)
    result = prepare_from_teacher(config(files, out, overwrite=True), TINY_WAN)
    assert result["written"] == 7 and folder_bytes(out) == folder_bytes(straight)
    prepare_toy(PrepareConfig(output=tmp_path / "toy", count=3, progress=False))
    with pytest.raises(ValueError, match="not written by --from-teacher"):
        prepare_from_teacher(config(files, tmp_path / "toy"), TINY_WAN)
    prepare_from_teacher(config(files, tmp_path / "toy", overwrite=True, steps=1), TINY_WAN)
    assert not (tmp_path / "toy" / "toy.json").exists() and read_manifest(tmp_path / "toy").count == 7


def test_flags_that_need_or_exclude_from_teacher_are_named():
    with pytest.raises(ValueError, match="need --from-teacher"):
        PrepareConfig(model="wan1.3b", teacher_data=TeacherDataConfig(prompt_file=Path("p.txt")))
    with pytest.raises(ValueError, match="no --model toy"):
        PrepareConfig(teacher_data=TeacherDataConfig(from_teacher=True, random_teacher=True))
    with pytest.raises(ValueError, match="exactly one of --teacher"):
        PrepareConfig(model="wan1.3b", teacher_data=TeacherDataConfig(from_teacher=True))
    with pytest.raises(ValueError, match="--guidance: guidance scale must be finite and >= 1"):
        TeacherDataConfig(guidance=0.5)
    with pytest.raises(ValueError, match="sigma_max must be finite and > 0"):
        TeacherDataConfig(sigma_max=float("inf"))
    with pytest.raises(ValueError, match="--teacher-model cosmos2b does not take wan1.3b's inputs"):
        teacher = TeacherDataConfig(from_teacher=True, random_teacher=True, teacher_model="cosmos2b")
        PrepareConfig(model="wan1.3b", teacher_data=teacher)


def test_cli_runs_the_teacher_path_and_reports_throughput(files, straight, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "get_spec", lambda name: TINY_WAN)  # the registry's wan1.3b is 1.3B parameters
    argv = ["prepare", "--from-teacher", "--model", "wan1.3b", "--teacher", str(files / "wan.safetensors")]
    argv += ["--prompt-file", str(files / "prompts.txt"), "--steps", "3", "--teacher-dtype", "float32", "--batch", "2"]
    argv += ["--text-encoder", str(files), "--negative-prompt", "x y", "--shard-size", "2", "--seed", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--device", "cpu", "--no-progress", "--output", str(tmp_path)])
    prepare.main()
    out = capsys.readouterr().out
    assert "7 teacher samples written now by rank 0 of 1" in out and "samples/hour" in out, out
    assert folder_bytes(tmp_path) == folder_bytes(straight)
