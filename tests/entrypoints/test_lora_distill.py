"""entrypoints.distill --lora-rank on the tiny toy: adapters train, checkpoint, resume and are checked."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.config import DistillConfig, fingerprint, loop_config
from entrypoints.distill import run
from tests.entrypoints.test_distill import tiny_config


def test_a_lora_run_trains_only_adapters_and_resumes_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    lora = {"lora_rank": 3, "lora_alpha": 6.0, "lora_targets": ("attention", "ffn", "modulation")}
    final = run(tiny_config(straight, **lora))
    run(tiny_config(resumed, iterations=3, **lora))
    run(tiny_config(resumed, **lora))  # picks up step-00000003
    for name in ("student", "ema", "fake"):
        a = load_file(straight / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        b = load_file(resumed / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert a and all(k.endswith((".weight.lora_down", ".weight.lora_up")) for k in a), name
        assert any("modulation" in k for k in a) and any(".mlp." in k for k in a)
        ups = [a[k] for k in a if k.endswith("lora_up")]
        assert all(u.shape[1] == 3 for u in ups) and any(u.abs().max() > 0 for u in ups), name  # trained from 0
    lines = lambda p: (p / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert lines(straight) == lines(resumed)
    losses = [v for line in lines(straight) for k, v in json.loads(line).items() if k.endswith("loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert "student 4-step" in final["rows"]  # evaluated on the teacher weights merged with the EMA adapters


def test_a_lora_checkpoint_is_not_resumed_as_full_fine_tuning_nor_read_as_weights(tmp_path):
    from entrypoints.run_folder import training_weights

    run(tiny_config(tmp_path, iterations=3, lora_rank=2))
    with pytest.raises(ValueError, match="holds LoRA adapters"):
        training_weights(tmp_path / "checkpoints" / "step-00000003")
    with pytest.raises(ValueError, match="another configuration.*lora_rank"):
        run(tiny_config(tmp_path, iterations=6))


def test_bad_lora_flags_are_named(tmp_path):
    with pytest.raises(ValueError, match="lora rank must be >= 0"):
        tiny_config(tmp_path, lora_rank=-1)
    with pytest.raises(ValueError, match=r"unknown lora targets \['qkv'\]"):
        tiny_config(tmp_path, lora_rank=2, lora_targets=("qkv",))
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        tiny_config(tmp_path, lora_rank=2, lora_alpha=-1.0)
    with pytest.raises(ValueError, match=r"lora rank 33 exceeds min\(out, in\) = 32 of blocks.0"):
        run(tiny_config(tmp_path / "wide", lora_rank=33))  # the toy student is 32 wide


def test_full_fine_tuning_fingerprints_as_before_the_lora_flags():
    """Rank 0 (the default) leaves the fingerprint as it was, so older runs resume; LoRA runs record it."""
    base = DistillConfig()
    assert not any(k.startswith("lora") for k in fingerprint(base))
    assert not any(k.startswith("lora") for k in fingerprint(dataclasses.replace(base, lora_targets=("ffn",))))
    assert fingerprint(dataclasses.replace(base, lora_rank=4))["lora_rank"] == 4


def test_adapters_train_at_ten_times_the_presets_rates_unless_a_rate_is_given():
    full = loop_config(DistillConfig(model="wan1.3b")).optim
    lora = loop_config(DistillConfig(model="wan1.3b", lora_rank=8)).optim
    assert (lora.student_lr, lora.fake_lr) == (10 * full.student_lr, 10 * full.fake_lr)
    given = loop_config(DistillConfig(model="wan1.3b", lora_rank=8, student_lr=3e-6)).optim
    assert (given.student_lr, given.fake_lr) == (3e-6, 10 * full.fake_lr)


def test_lora_full_trains_the_biases_and_outer_layers_beside_the_adapters_and_resumes(tmp_path):
    """--lora-full biases outside-blocks: the checkpoints hold those tensors under their own keys, they move
    from the warm start, resume bit for bit, and the evaluation merges them in place."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    lora = {"lora_rank": 2, "lora_targets": ("attention", "ffn"), "lora_full": ("biases", "outside-blocks")}
    final = run(tiny_config(straight, **lora))
    run(tiny_config(resumed, iterations=3, **lora))
    run(tiny_config(resumed, **lora))
    start = load_file(straight / "checkpoints" / "step-00000003" / "student.safetensors")
    for name in ("student", "ema", "fake"):
        a = load_file(straight / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        b = load_file(resumed / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        full = [k for k in a if not k.endswith((".lora_down", ".lora_up"))]
        assert "head.weight" in full and "pos_t" in full and "blocks.0.mlp.0.bias" in full, name
        assert not any(k.startswith("blocks.") and k.endswith(".weight") for k in full), name  # adapters' job
    student = load_file(straight / "checkpoints" / "step-00000006" / "student.safetensors")
    assert any(not torch.equal(student[k], start[k]) for k in ("head.weight", "blocks.0.mlp.0.bias"))
    assert "student 4-step" in final["rows"]
    assert fingerprint(tiny_config(straight, **lora))["lora_full"] == ["biases", "outside-blocks"]
    assert "lora_full" not in fingerprint(tiny_config(straight, lora_rank=2))  # older LoRA runs resume
    with pytest.raises(ValueError, match="another configuration.*lora_full"):
        run(tiny_config(straight, iterations=9, lora_rank=2, lora_targets=("attention", "ffn")))


def test_bad_lora_full_flags_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown lora full-training scopes \['norms'\]"):
        tiny_config(tmp_path, lora_rank=2, lora_full=("norms",))
    with pytest.raises(ValueError, match="need rank > 0"):
        tiny_config(tmp_path, lora_full=("biases",))
