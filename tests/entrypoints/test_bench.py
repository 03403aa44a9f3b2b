"""entrypoints.bench: the models benchmark runs on the CPU with the tiny config and writes its JSON."""

import json

import pytest

from entrypoints.bench.__main__ import main
from entrypoints.bench.models import CONFIGS, model_flops


@pytest.mark.parametrize(
    "config, tokens",
    [("wan-tiny", 3 * 4 * 6), ("cosmos-tiny", 2 * 4 * 6), ("wan2.2-tiny", 2 * 2 * 3), ("wan-i2v-tiny", 3 * 4 * 6)],
)
def test_models_benchmark_smoke_on_cpu(tmp_path, config, tokens):
    out = tmp_path / "models.json"
    main(
        [
            "models",
            "--config",
            config,
            "--dtype",
            "fp32",
            "--warmup",
            "1",
            "--iters",
            "1",
            "--rows",
            "forward",
            "eager jvp",
            "forward+backward",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["model"] == config and result["tokens"] == tokens
    assert [row["what"] for row in result["rows"]] == ["forward", "eager jvp", "forward+backward"]
    assert all(row["ms"] > 0 and row["flops"] > 0 for row in result["rows"])
    forward, jvp, backward = (row["flops"] for row in result["rows"])
    linear, attention = result["linear_flops"], result["attention_flops"]
    assert forward == linear + attention and jvp == 2 * linear + 3 * attention and backward == 3 * forward


def test_block_compiled_rows_run_on_cpu(tmp_path):
    """The trainers' `--compile` forward and the sharded trainer's compiled tangent pass as rows (the
    latter primes its graphs, then times them)."""
    out = tmp_path / "models.json"
    rows = ["block-compiled forward", "block-compiled dual jvp"]
    main(["models", "--config", "wan-tiny", "--dtype", "fp32", "--warmup", "1", "--iters", "1"]
         + ["--rows", *rows, "--device", "cpu", "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    forward, jvp = result["rows"]
    assert [forward["what"], jvp["what"]] == rows
    assert all(row["ms"] > 0 and row["first_call_s"] > 0 for row in (forward, jvp))
    assert forward["flops"] == result["linear_flops"] + result["attention_flops"]
    assert jvp["flops"] == 2 * result["linear_flops"] + 3 * result["attention_flops"]


def test_model_flops_match_a_hand_count():
    """Cosmos 2B at 1024 px: 4,096 tokens, 512 text tokens (numbers from SPEC-models §2.1)."""
    case = CONFIGS["cosmos2b"]
    D, F, N, L, Lc = 2048, 8192, 28, 4096, 512
    r = 256  # adaLN-LoRA bottleneck: the time path runs once per sample (D -> D -> 3D, 3 modulations a block)
    per_sample = 4 * D * D + N * 12 * D * r + 3 * D * r
    linear = 2 * (N * (6 * D * D + 2 * D * F) * L + (68 + 64) * D * L + N * 2 * 1024 * D * Lc + per_sample)
    attention = N * (4 * L * L * D + 4 * L * Lc * D)
    assert model_flops(case, L) == (linear, attention)
