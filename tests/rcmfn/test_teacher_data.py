"""rcmfn.teacher_data: per-prompt seeds and noise, the shard plan over ranks, shard records, prompt files,
settings differences."""

import json

import pytest
import torch

from rcmfn.shards import DatasetError, read_manifest
from rcmfn.teacher_data import (
    prompt_noise,
    prompt_seed,
    rank_shards,
    read_prompt_file,
    settings_differences,
    shard_is_written,
    shard_ranges,
    write_teacher_shard,
)


def test_seed_zero_seeds_sample_i_with_i_as_the_official_builder_and_seeds_never_collide():
    assert [prompt_seed(0, i) for i in range(4)] == [0, 1, 2, 3]
    seeds = {prompt_seed(s, i) for s in range(5) for i in range(0, 1_000_003, 9973)}
    assert len(seeds) == 5 * len(range(0, 1_000_003, 9973))
    with pytest.raises(ValueError, match=">= 0"):
        prompt_seed(0, -1)


def test_a_prompts_noise_does_not_depend_on_its_batch():
    whole = prompt_noise((2, 1, 3, 5), 7, range(0, 5))
    assert torch.equal(prompt_noise((2, 1, 3, 5), 7, [3, 1]), whole[[3, 1]])
    assert torch.equal(whole[2], torch.randn(2, 1, 3, 5, generator=torch.Generator().manual_seed(7_000_021 + 2)))
    assert whole.dtype == torch.float32 and (whole[0] - whole[1]).abs().mean() > 0.5


@pytest.mark.parametrize("count, size", [(1, 1), (7, 2), (8, 4), (5, 256), (97, 10)])
def test_every_prompt_lies_in_one_shard_and_every_shard_in_one_rank(count, size):
    plan = shard_ranges(count, size)
    assert [i for r in plan for i in r] == list(range(count)) and all(1 <= len(r) <= size for r in plan)
    for world in (1, 2, 3, 5):
        owned = [k for rank in range(world) for k in rank_shards(len(plan), rank, world)]
        assert sorted(owned) == list(range(len(plan)))
        sizes = [len(rank_shards(len(plan), rank, world)) for rank in range(world)]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="0 <= rank < world"):
        rank_shards(3, 2, 2)


def test_prompt_files_skip_blank_lines_and_name_the_problem(tmp_path):
    (tmp_path / "p.txt").write_text("  first prompt \n\n\t\nsecond\n")
    assert read_prompt_file(tmp_path / "p.txt") == ["first prompt", "second"]
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompt_file(tmp_path / "none.txt")
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "blank.txt")
    with pytest.raises(ValueError, match="needs --prompt-file"):
        read_prompt_file(None)


def shard(seed: int, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 1, 2, 2, generator=gen).bfloat16(), torch.randn(n, 3, 8, generator=gen).bfloat16()


def test_a_shard_counts_as_written_only_with_its_record_its_range_and_its_bytes(tmp_path):
    latents, texts = shard(0)
    assert not shard_is_written(tmp_path, 1, range(2, 4))
    info = write_teacher_shard(tmp_path, 1, range(2, 4), latents, texts, ["a", "b"])
    assert info.file == "shard-00001.safetensors" and info.prompts == "shard-00001.json"
    assert shard_is_written(tmp_path, 1, range(2, 4)) and not shard_is_written(tmp_path, 1, range(2, 3))
    (tmp_path / "shard-00001.json").write_text(json.dumps(["a", "c"]))  # altered after its record
    assert not shard_is_written(tmp_path, 1, range(2, 4))
    assert shard_is_written(tmp_path, 1, range(2, 4), verify=False)  # the record alone, as finish_output asks
    (tmp_path / "shard-00001.record.json").write_text("{not json")
    assert not shard_is_written(tmp_path, 1, range(2, 4))


def test_a_non_finite_sample_is_refused_naming_its_prompt(tmp_path):
    latents, texts = shard(1, 3)
    latents[1, 0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"prompt 5 \('y'\): its latent holds non-finite values"):
        write_teacher_shard(tmp_path, 2, range(4, 7), latents, texts, ["x", "y", "z"])
    assert not (tmp_path / "shard-00002.record.json").exists()
    with pytest.raises(ValueError, match="2 prompts for the 3 prompts 4..6"):
        write_teacher_shard(tmp_path, 2, range(4, 7), latents, texts, ["x", "y"])
    with pytest.raises(DatasetError, match="no manifest"):
        read_manifest(tmp_path)  # records and shard files alone are not a dataset: the manifest lists them


def test_settings_differences_name_nested_keys_and_ignore_where_files_were_read():
    saved = {"sampler": {"steps": 50, "shift": 5.0}, "seed": 0, "paths": {"teacher": "/a"}}
    now = {"sampler": {"steps": 20, "shift": 5.0}, "seed": 0, "paths": {"teacher": "/b"}, "new": 1}
    assert settings_differences(saved, now) == ["new: None vs now 1", "sampler.steps: 50 vs now 20"]
    assert settings_differences(saved, saved) == []
