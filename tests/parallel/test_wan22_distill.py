"""Wan2.2 TI2V-5B distillation through the sharded runner, one process on the CPU: the tiny Wan2.2
architecture (48 latent channels) trains text- and image-to-video (--image-fraction 0.5: each
sample conditioned on its own first latent frame or not) with finite losses; its EMA export loads strictly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from rcmfn.models.registry import build_model, get_spec
from rcmfn.shards import ShardWriter, write_negative_embedding

ROOT = Path(__file__).resolve().parents[2]
SPEC = get_spec("wan2.2-tiny")


def test_tiny_wan22_distils_text_and_image_to_video_and_exports_a_loadable_student(tmp_path):
    g = torch.Generator().manual_seed(0)
    text = (SPEC.text_len, SPEC.text_dim)
    with ShardWriter(tmp_path / "data", SPEC.latent_shape, text, "float32", 3) as writer:
        for i in range(4):
            writer.add(torch.randn(SPEC.latent_shape, generator=g), torch.randn(text, generator=g), f"prompt {i}")
    write_negative_embedding(tmp_path / "data", torch.randn(text, generator=g))
    command = [sys.executable, "-m", "entrypoints.distill", "--model", "wan2.2-tiny", "--distributed.random-init"]
    command += ["--distributed.dtype", "float64", "--distributed.data", str(tmp_path / "data")]
    command += ["--output", str(tmp_path / "run"), "--iterations", "4", "--student-update-freq", "2"]
    command += ["--tangent-warmup", "1", "--log-every", "1", "--no-progress", "--image-fraction", "0.5"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(command, cwd=ROOT, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in lines] == ["student", "student", "critic", "student"]
    assert all(math.isfinite(m["scm_loss"]) and m["scm_loss"] > 0 for m in lines if m["phase"] == "student")
    assert all(math.isfinite(m["dmd_loss"]) for m in lines[1:] if m["phase"] == "student")
    model, report = build_model(SPEC, tmp_path / "run" / "student_ema.safetensors", "ours")
    assert report.ok and model.patch_embedding.weight.shape == (48, 48, 1, 2, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
