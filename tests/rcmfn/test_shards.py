"""rcmfn.shards: the on-disk format round-trips, errors name the broken file, the loader is deterministic."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from rcmfn.shards import (
    DatasetError,
    ShardLoader,
    ShardWriter,
    read_manifest,
    read_negative_embedding,
    read_uncondition,
    write_negative_embedding,
    write_zero_uncondition,
)

LATENT, TEXT = (2, 1, 3, 5), (4, 3)


def _sample(i: int, latent=LATENT, text=TEXT):
    g = torch.Generator().manual_seed(i)
    return torch.randn(latent, generator=g) + i, torch.randn(text, generator=g) - i


def _write(folder, n: int, shard_size: int, start: int = 0, dtype="bfloat16", prompts=True):
    with ShardWriter(folder, LATENT, TEXT, dtype, shard_size) as writer:
        for i in range(start, start + n):
            writer.add(*_sample(i), f"prompt {i}" if prompts else None)
    return read_manifest(folder)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 11), shard_size=st.integers(1, 5), dtype=st.sampled_from(["bfloat16", "float32"]))
def test_writer_round_trips_every_sample_in_order(tmp_path_factory, n, shard_size, dtype):
    folder = tmp_path_factory.mktemp("ds")
    manifest = _write(folder, n, shard_size, dtype=dtype)
    assert manifest.count == n and [s.count for s in manifest.shards][:-1] == [shard_size] * (len(manifest.shards) - 1)
    loader = ShardLoader(folder, batch_size=1, rank=0, world=1, seed=0)
    seen = {}
    for _ in range(n):
        batch = next(loader)
        seen[batch.indices[0]] = batch
    assert sorted(seen) == list(range(n))
    for i, batch in seen.items():
        latent, text = _sample(i)
        torch.testing.assert_close(batch.latents[0], latent.to(getattr(torch, dtype)), rtol=0, atol=0)
        torch.testing.assert_close(batch.text_embeddings[0], text.to(getattr(torch, dtype)), rtol=0, atol=0)
        assert batch.prompts == (f"prompt {i}",)


def test_reopening_a_folder_appends_after_the_last_shard(tmp_path):
    _write(tmp_path, 5, 2)
    manifest = _write(tmp_path, 4, 3, start=5)
    assert [s.count for s in manifest.shards] == [2, 2, 1, 3, 1]
    assert len({s.file for s in manifest.shards}) == 5
    loader = ShardLoader(tmp_path, batch_size=9, rank=0, world=1, seed=3)
    batch = next(loader)
    for pos, i in enumerate(batch.indices):
        torch.testing.assert_close(batch.latents[pos], _sample(i)[0].bfloat16(), rtol=0, atol=0)


def test_reopening_with_other_shapes_is_refused(tmp_path):
    _write(tmp_path, 2, 2)
    with pytest.raises(ValueError, match="cannot append"):
        ShardWriter(tmp_path, (2, 1, 3, 6), TEXT, "bfloat16", 2)


def test_add_rejects_wrong_shapes(tmp_path):
    writer = ShardWriter(tmp_path, LATENT, TEXT, "bfloat16", 2)
    with pytest.raises(ValueError, match="latent shape"):
        writer.add(torch.randn(2, 1, 3, 4), torch.randn(TEXT))
    with pytest.raises(ValueError, match="text embedding shape"):
        writer.add(torch.randn(LATENT), torch.randn(4, 2))


def test_interrupted_writer_leaves_the_complete_shards_readable(tmp_path):
    writer = ShardWriter(tmp_path, LATENT, TEXT, "bfloat16", 2)
    for i in range(5):
        writer.add(*_sample(i), None)
    del writer  # never closed: the fifth sample is lost, the first four are a valid dataset
    manifest = read_manifest(tmp_path)
    assert manifest.count == 4 and all(s.prompts is None for s in manifest.shards)
    assert not list(tmp_path.glob(".*tmp"))


def test_negative_embedding_round_trips_and_survives_later_shards(tmp_path):
    writer = ShardWriter(tmp_path, LATENT, TEXT, "bfloat16", 2)
    assert read_negative_embedding(tmp_path) is None
    negative = torch.randn(TEXT)
    write_negative_embedding(tmp_path, negative)
    for i in range(3):
        writer.add(*_sample(i))
    writer.close()
    torch.testing.assert_close(read_negative_embedding(tmp_path), negative.bfloat16(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="text shape"):
        write_negative_embedding(tmp_path, torch.randn(3, 4))


def test_manifest_says_which_unconditional_input_cfg_uses(tmp_path):
    """The manifest's uncondition is "negative_prompt" with a stored embedding, "zeros" without one, and
    read_uncondition returns the embedding or zeros of the text shape; switching drops the stored file."""
    writer = ShardWriter(tmp_path, LATENT, TEXT, "bfloat16", 2)
    write_zero_uncondition(tmp_path)
    for i in range(3):
        writer.add(*_sample(i))
    writer.close()
    assert read_manifest(tmp_path).uncondition == "zeros"
    assert json.loads((tmp_path / "manifest.json").read_text())["uncondition"] == "zeros"
    zeros = read_uncondition(tmp_path)
    assert zeros.dtype == torch.bfloat16 and torch.equal(zeros, torch.zeros(TEXT, dtype=torch.bfloat16))
    negative = torch.randn(TEXT)
    write_negative_embedding(tmp_path, negative)
    assert read_manifest(tmp_path).uncondition == "negative_prompt"
    assert torch.equal(read_uncondition(tmp_path), negative.bfloat16())
    write_zero_uncondition(tmp_path)
    assert read_negative_embedding(tmp_path) is None and not (tmp_path / "negative.safetensors").exists()
    assert read_manifest(tmp_path).uncondition == "zeros"


def test_a_manifest_without_the_uncondition_field_is_read_from_its_negative_embedding(tmp_path):
    for folder, negative in ((tmp_path / "with", torch.randn(TEXT)), (tmp_path / "without", None)):
        _write(folder, 2, 2)
        if negative is not None:
            write_negative_embedding(folder, negative)
        raw = json.loads((folder / "manifest.json").read_text())
        del raw["uncondition"]
        (folder / "manifest.json").write_text(json.dumps(raw))
        assert read_manifest(folder).uncondition == ("zeros" if negative is None else "negative_prompt")
    raw["uncondition"] = "negative_prompt"  # but no negative embedding listed
    (tmp_path / "without" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="uncondition 'negative_prompt' with negative_embedding None"):
        read_manifest(tmp_path / "without")


def _corrupt(folder, how):
    manifest = json.loads((folder / "manifest.json").read_text())
    if how == "no_folder":
        return folder / "absent"
    if how == "no_manifest":
        (folder / "manifest.json").unlink()
    elif how == "bad_json":
        (folder / "manifest.json").write_text("{not json")
    elif how == "wrong_format":
        (folder / "manifest.json").write_text(json.dumps({**manifest, "format": "webdataset"}))
    elif how == "wrong_version":
        (folder / "manifest.json").write_text(json.dumps({**manifest, "version": 7}))
    elif how == "missing_shard":
        (folder / "shard-00001.safetensors").unlink()
    elif how == "truncated_shard":
        path = folder / "shard-00000.safetensors"
        path.write_bytes(path.read_bytes()[:40])
    elif how == "count_mismatch":
        manifest["shards"][0]["count"] = 3
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif how == "shape_mismatch":
        (folder / "manifest.json").write_text(json.dumps({**manifest, "text_shape": [4, 4]}))
    elif how == "prompt_mismatch":
        (folder / "shard-00000.json").write_text(json.dumps(["only one"]))
    return folder


ERRORS = {
    "no_folder": "does not exist",
    "no_manifest": "no manifest.json",
    "bad_json": "not valid JSON",
    "wrong_format": "not an rcmfn-shards",
    "wrong_version": "version 7",
    "missing_shard": "shard-00001.*missing",
    "truncated_shard": "shard-00000.*not a readable",
    "count_mismatch": "shard-00000.*latents",
    "shape_mismatch": "text_embeddings",
    "prompt_mismatch": "1 prompts for 2",
}


@pytest.mark.parametrize("how", sorted(ERRORS))
def test_read_manifest_names_the_broken_file(tmp_path, how):
    _write(tmp_path, 4, 2)
    with pytest.raises(DatasetError, match=ERRORS[how]):
        read_manifest(_corrupt(tmp_path, how))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_read_disjoint_slices_of_one_global_order(tmp_path, world):
    _write(tmp_path, 13, 4, prompts=False)
    loaders = [ShardLoader(tmp_path, 2, r, world, seed=5) for r in range(world)]
    steps = 13 // (2 * world)
    for epoch in range(2):
        order = loaders[0].epoch_order(epoch).tolist()
        for step in range(steps):
            got = [next(loader).indices for loader in loaders]
            assert sum(got, ()) == tuple(order[step * 2 * world : (step + 1) * 2 * world])


def test_other_seed_gives_another_order(tmp_path):
    _write(tmp_path, 8, 4, prompts=False)
    assert (
        ShardLoader(tmp_path, 1, 0, 1, 0).epoch_order(0).tolist()
        != ShardLoader(tmp_path, 1, 0, 1, 1).epoch_order(0).tolist()
    )


def test_resumed_loader_continues_exactly_even_with_another_world_size(tmp_path):
    _write(tmp_path, 12, 5, prompts=False)
    straight = ShardLoader(tmp_path, 2, 0, 1, seed=1)
    reference = [next(straight).indices for _ in range(9)]  # crosses two epoch boundaries
    first = ShardLoader(tmp_path, 2, 0, 1, seed=1)
    head = [next(first).indices for _ in range(4)]
    resumed = ShardLoader(tmp_path, 2, 0, 1, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + [next(resumed).indices for _ in range(5)] == reference
    pair = [ShardLoader(tmp_path, 1, r, 2, seed=1) for r in range(2)]
    for loader in pair:
        loader.load_state_dict(first.state_dict())
    assert next(pair[0]).indices + next(pair[1]).indices == reference[4]


def test_loader_refuses_bad_arguments_and_foreign_state(tmp_path):
    _write(tmp_path, 4, 4, prompts=False)
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(tmp_path, 1, 2, 2)
    with pytest.raises(DatasetError, match="cannot fill"):
        ShardLoader(tmp_path, 3, 0, 2)
    loader = ShardLoader(tmp_path, 1, 0, 1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict({**loader.state_dict(), "seed": 9})


def test_non_finite_samples_are_refused_when_written_and_when_read(tmp_path):
    writer = ShardWriter(tmp_path / "w", LATENT, TEXT, "bfloat16", 2)
    writer.add(*_sample(0))
    bad = torch.randn(LATENT)
    bad[0, 0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"sample 1 \(prompt 'cat'\): its latent holds non-finite values"):
        writer.add(bad, torch.randn(TEXT), "cat")
    with pytest.raises(ValueError, match="text embedding holds non-finite"):
        writer.add(torch.randn(LATENT), torch.full(TEXT, float("inf")), "dog")
    # A shard damaged after writing (or written by other code): the loader names the file and the row.
    _write(tmp_path / "r", 4, 4, dtype="float32")
    manifest = read_manifest(tmp_path / "r")
    path = manifest.folder / manifest.shards[0].file
    tensors = load_file(path)
    tensors["latents"][2, 0, 0, 0, 0] = float("inf")
    save_file(tensors, path)
    loader = ShardLoader(tmp_path / "r", batch_size=4, rank=0, world=1)
    with pytest.raises(ValueError, match=rf"{path.name}: row 2 of latents holds non-finite values"):
        next(loader)
