"""Shards with per-sample condition tensors (Wan I2V's image states and first-frame condition)."""

import json

import pytest
import torch

from rcmfn.condition import make_condition, with_text
from rcmfn.shards import DatasetError, ShardLoader, ShardWriter, read_manifest

LATENT, TEXT = (16, 2, 4, 6), (3, 8)
CONDITIONS = {"image": (5, 7), "latent": (20, 2, 4, 6)}


def sample(i: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(i)
    draw = lambda shape: torch.randn(shape, generator=g) + i  # noqa: E731 (each sample distinct)
    return draw(LATENT), draw(TEXT), {k: draw(s) for k, s in CONDITIONS.items()}


def test_conditions_round_trip_through_the_loader_into_a_condition_tensordict(tmp_path):
    with ShardWriter(tmp_path, LATENT, TEXT, "float32", shard_size=3, conditions=CONDITIONS) as writer:
        for i in range(5):
            latent, text, condition = sample(i)
            writer.add(latent, text, f"p{i}", condition)
    manifest = read_manifest(tmp_path)
    assert dict(manifest.conditions) == CONDITIONS and len(manifest.shards) == 2
    assert json.loads((tmp_path / "manifest.json").read_text())["conditions"]["image"] == [5, 7]
    batch = next(ShardLoader(tmp_path, 2, 0, 1, seed=4))
    for row, index in enumerate(batch.indices):
        latent, text, condition = sample(index)
        assert torch.equal(batch.latents[row], latent) and torch.equal(batch.text_embeddings[row], text)
        for name in CONDITIONS:
            assert torch.equal(batch.conditions[name][row], condition[name])
    cond = make_condition(batch.text_embeddings, **batch.conditions)
    uncond = with_text(cond, torch.zeros(TEXT))
    assert cond.shape == (2,) and torch.equal(uncond["image"], batch.conditions["image"])


def test_text_only_datasets_keep_their_manifest_and_batches(tmp_path):
    with ShardWriter(tmp_path, LATENT, TEXT, "float32", shard_size=2) as writer:
        for i in range(2):
            writer.add(*sample(i)[:2])
    assert "conditions" not in json.loads((tmp_path / "manifest.json").read_text())
    assert next(ShardLoader(tmp_path, 2, 0, 1)).conditions == {}


def test_missing_or_misshaped_conditions_are_refused(tmp_path):
    writer = ShardWriter(tmp_path, LATENT, TEXT, "float32", conditions=CONDITIONS)
    latent, text, condition = sample(0)
    with pytest.raises(ValueError, match="condition shapes"):
        writer.add(latent, text)
    with pytest.raises(ValueError, match="condition shapes"):
        writer.add(latent, text, None, {**condition, "image": condition["image"][:4]})
    with pytest.raises(ValueError, match="conditions"):  # reopening with other conditions
        ShardWriter(tmp_path, LATENT, TEXT, "float32")
    writer.add(latent, text, None, condition)
    writer.close()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["conditions"]["image"] = [6, 7]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="condition.image"):
        read_manifest(tmp_path)
