"""entrypoints.bench: the models benchmark runs on the CPU with the tiny config and writes its JSON."""

import json

from entrypoints.bench import main


def test_models_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / "models.json"
    main(
        [
            "models",
            "--config",
            "tiny",
            "--dtype",
            "fp32",
            "--warmup",
            "1",
            "--iters",
            "1",
            "--rows",
            "forward",
            "eager jvp",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["model"] == "wantiny" and result["tokens"] == 3 * 4 * 6
    assert [row["what"] for row in result["rows"]] == ["forward", "eager jvp"]
    assert all(row["ms"] > 0 and row["flops"] > 0 for row in result["rows"])
    assert result["rows"][1]["flops"] > result["rows"][0]["flops"]
