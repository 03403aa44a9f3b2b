"""entrypoints/toy_seeds.py: tiny toy runs per seed, their students checked against the bar, failures named."""

import json
from pathlib import Path

import pytest

from entrypoints.toy_seeds import SeedsConfig, core_groups, main
from tests.conftest import cli_flags
from tests.entrypoints.test_distill import TINY_TOY_FLAGS

TINY = [*TINY_TOY_FLAGS, "--iterations", "4"]


def test_core_groups():
    assert core_groups([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3]]
    assert core_groups([4, 7], 1) == [[4], [7]]
    assert core_groups([0], 2) == [[0]]  # too few cores: the runs share them


def test_two_seeds_run_and_are_checked(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["--seeds", "3", "5", "--cores-per-run", "1", "--output", str(out), "--", *TINY]) == 0
    report = json.loads((out / "seeds.json").read_text())
    assert [r["seed"] for r in report["results"]] == [3, 5] and report["distill_flags"] == TINY
    for result in report["results"]:
        run = json.loads((out / f"seed-{result['seed']}" / "metrics.json").read_text())
        assert result["students"]["student 2-step"]["weight_tv"] == run["rows"]["student 2-step"]["weight_tv"]
        assert isinstance(result["misses"], list) and result["seconds"] > 0
        config = json.loads((out / f"seed-{result['seed']}" / "config.json").read_text())
        assert json.dumps(config).count(f'"seed": {result["seed"]}') >= 1
    # 4 iterations of a width-32 net do not meet the bar; each seed's misses are printed, then the count
    printed = capsys.readouterr().out
    assert "seed 3: 2-step" in printed and "misses: student" in printed
    assert f"{sum(not r['misses'] for r in report['results'])} of 2 seeds meet the whole bar" in printed


def test_a_failed_run_is_named_and_sets_the_exit_status(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["--seeds", "0", "--cores-per-run", "1", "--output", str(out), "--", *TINY, "--no-such-flag"]) == 1
    printed = capsys.readouterr().out
    assert "seed 0: FAILED (exit status 2" in printed and "1 failed" in printed
    assert "failed" in json.loads((out / "seeds.json").read_text())["results"][0]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"seeds": ()}, "at least one seed"), ({"seeds": (1, 1)}, "each once"), ({"cores_per_run": 0}, ">= 1")],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SeedsConfig(**kwargs)


def test_cli_snapshot():
    """The CLI changes only on purpose: update tests/entrypoints/toy_seeds_flags.txt with the change."""
    snapshot = Path(__file__).with_name("toy_seeds_flags.txt")
    assert cli_flags("entrypoints.toy_seeds") == snapshot.read_text().split()
