"""`--stages` on the toy: flag errors name the problem; checkpoints record the stage; a run resumed
mid-stage or exactly at a stage boundary ends bit for bit where the uninterrupted run does."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints import toy_run
from entrypoints.config import run_stages, total_iterations
from entrypoints.distill import run
from entrypoints.stop_signal import StopSignal
from rcmfn.stages import Stage
from tests.entrypoints.test_distill import tiny_config

STAGES = "dcm:2,scm:2,rcm:4"  # boundaries at 2 and 4; the fake score first trains at 6


def staged_config(output: Path, **overrides):
    return tiny_config(output, **({"iterations": None, "stages": STAGES, "save_every": 100} | overrides))


class StopAt(StopSignal):
    """A Ctrl-C that arrives during iteration `at - 1`: the run saves at `at` and returns."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def __call__(self) -> bool:
        return self.iteration >= self.at - 1


def _tensors(run_dir: Path, iteration: int) -> dict:
    folder = run_dir / "checkpoints" / f"step-{iteration:08d}"
    return {name: load_file(folder / f"{name}.safetensors") for name in ("student", "ema", "fake")}


def _state(run_dir: Path, iteration: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step-{iteration:08d}" / "meta.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    final = run(staged_config(output))
    return output, final


def test_stages_set_the_run_length_and_each_stage_trains_its_method(straight):
    output, final = straight
    assert final["iterations"] == 8 == total_iterations(staged_config(output))
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [(m["iteration"], m["stage"], m["method"]) for m in lines] == [
        (0, 0, "dcm"), (1, 0, "dcm"), (2, 1, "scm"), (3, 1, "scm"),
        (4, 2, "rcm"), (5, 2, "rcm"), (6, 2, "rcm"), (7, 2, "rcm"),
    ]  # fmt: skip
    losses = [sorted(k for k in m if k.endswith("loss")) for m in lines]
    assert losses[:4] == [["dcm_loss"]] * 2 + [["scm_loss"]] * 2
    # rcm restarts its schedule at 4: H = 1 sCM-only iteration, then a student step every F = 2
    assert [m["phase"] for m in lines[4:]] == ["student", "student", "critic", "student"]
    assert losses[4:] == [["scm_loss"], ["dmd_loss", "scm_loss"], ["fake_score_loss"], ["dmd_loss", "scm_loss"]]
    assert _state(output, 8).items() >= {"stage": 2, "stage_method": "rcm", "stage_start": 4}.items()


@pytest.mark.parametrize("at", [2, 4, 5, 6])  # two boundaries, mid-stage before and after the first critic step
def test_a_resume_mid_stage_or_at_a_boundary_continues_bit_for_bit(straight, tmp_path, monkeypatch, at):
    reference, _ = straight
    monkeypatch.setattr(toy_run, "stop_signals", lambda: contextlib.nullcontext(StopAt(at)))
    assert run(staged_config(tmp_path))["stopped_by_signal"]
    stage = {2: 1, 4: 2, 5: 2, 6: 2}[at]
    assert _state(tmp_path, at).items() >= {"stage": stage, "stage_start": {1: 2, 2: 4}[stage]}.items()
    monkeypatch.undo()
    run(staged_config(tmp_path))
    a, b = _tensors(reference, 8), _tensors(tmp_path, 8)
    for name in a:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    lines = lambda p: (p / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert lines(reference) == lines(tmp_path)


def test_a_checkpoint_of_other_stages_is_refused(straight, tmp_path):
    run(staged_config(tmp_path, stages="dcm:2,rcm:2"))
    with pytest.raises(
        ValueError, match="another configuration.*stages: checkpoint 'dcm:2,rcm:2' vs now 'dcm:2,rcm:3'"
    ):
        run(staged_config(tmp_path, stages="dcm:2,rcm:3"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"stages": "dcm:2,foo:3"}, "unknown method 'foo'"),
        ({"stages": "dcm:0"}, "iterations must be >= 1; got 0"),
        ({"stages": "dcm:2;scm:3"}, "iterations '2;scm:3' is not a whole number"),
        ({"stages": "dcm:2,scm:3", "iterations": 10}, "--iterations 10 differs from the 5 that --stages adds up to"),
        ({"stages": "dcm:2,scm:3", "method": "scm"}, "--stages sets each stage's method: leave --method unset"),
        ({"stages": "dcm:2,dmd:3", "tangent_warmup": 5}, "method 'dmd' has no sCM term, so tangent_warmup must be 0"),
    ],
)
def test_bad_stages_fail_at_config_time_naming_the_problem(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        staged_config(tmp_path / "never", **overrides)
    assert not (tmp_path / "never").exists()


def test_each_stage_gets_the_loop_settings_of_its_method(tmp_path):
    cfg = staged_config(tmp_path, stages="dcm+dmd:3,scm:2,dmd:1", iterations=6, tangent_warmup=None)
    stages, configs = run_stages(cfg)
    assert stages == (Stage("dcm+dmd", 3), Stage("scm", 2), Stage("dmd", 1))
    assert [c.loss.method for c in configs] == ["dcm+dmd", "scm", "dmd"]
    assert [c.tangent_warmup for c in configs] == [100, 100, 0]  # the toy preset's H; dmd has no sCM term
    assert [c.loss.uses_critic for c in configs] == [True, False, True]
    assert configs[0].loss.loss_scale_dmd == configs[1].loss.loss_scale_dmd != configs[2].loss.loss_scale_dmd == 1.0
    plain_stages, plain_configs = run_stages(tiny_config(tmp_path))
    assert plain_stages == (Stage("rcm", 6),) and plain_configs[0].loss.method == "rcm"
