"""The sharded trainer (entrypoints.distributed, one process) distils the tiny I2V net on shards that carry
the image condition: the condition reaches every network call and the run's losses are finite."""

import json

import pytest
import torch

from entrypoints.config import DistillConfig, DistributedConfig
from entrypoints.distributed import check_before_gpu, run_distributed
from rcmfn.shards import ShardWriter, write_negative_embedding

LATENT, TEXT = (16, 2, 4, 4), (3, 24)
CONDITIONS = {"image": (5, 20), "latent": (20, 2, 4, 4)}  # wan-i2v-tiny: 5 CLIP tokens of 20; mask + latent


def shards(folder, conditions=CONDITIONS, count: int = 4):
    g = torch.Generator().manual_seed(0)
    with ShardWriter(folder, LATENT, TEXT, "float32", 2, conditions) as writer:
        for _ in range(count):
            extra = {k: torch.randn(s, generator=g) for k, s in conditions.items()}
            writer.add(torch.randn(LATENT, generator=g), torch.randn(TEXT, generator=g), "p", extra or None)
    write_negative_embedding(folder, torch.randn(TEXT, generator=g))
    return folder


def config(tmp_path, data, model="wan-i2v-tiny") -> DistillConfig:
    d = DistributedConfig(data=data, random_init=True, dtype="float64", batch_size=2)
    return DistillConfig(
        model=model, output=tmp_path / "run", distributed=d, iterations=3, student_update_freq=2, progress=False
    )


def test_i2v_run_on_conditioned_shards_trains_with_finite_losses(tmp_path):
    run_distributed(config(tmp_path, shards(tmp_path / "data")))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for line in lines for k, v in line.items() if k.endswith("loss") and isinstance(v, float)]
    assert losses and all(abs(v) < float("inf") for v in losses)


def test_data_without_the_image_condition_is_refused_before_any_gpu_work(tmp_path):
    with pytest.raises(ValueError, match="needs an image condition"):
        check_before_gpu(config(tmp_path, shards(tmp_path / "plain", {})), 1)
    with pytest.raises(ValueError, match="takes text only"):
        check_before_gpu(config(tmp_path, shards(tmp_path / "i2v"), model="wan-tiny"), 1)
