"""entrypoints/digits_study.py and entrypoints/digits.py: a tiny study end to end (report, figure, reuse of
finished pieces, refusal of pieces made with other settings), the real-data floor and the CLI."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from entrypoints import digits as world_lib
from entrypoints import experts_toy_study
from entrypoints.digits_study import DigitsStudyConfig, main
from entrypoints.presets import get_preset
from rcmfn.toy.digits import ClassifierConfig
from rcmfn.toy.tiny_dit import TinyDiTConfig, init_params
from rcmfn.toy.warm_start import WarmStartConfig
from tests.conftest import cli_flags

TINY = world_lib.DigitsConfig(
    net=TinyDiTConfig(channels=1, width=32, depth=1, heads=2, mlp_ratio=2, freq_dim=16),
    teacher=WarmStartConfig(steps=10, batch_size=16, warmup_steps=1),
    classifier=ClassifierConfig(steps=20),
    iterations=5,
    batch_size=8,
    tangent_warmup=1,  # the student's DMD term and the critic both run within 5 iterations
    teacher_steps=(2,),
    student_steps=(1, 2),
)


def test_tiny_study_writes_report_and_figure_then_reuses_its_pieces(tmp_path):
    report = tmp_path / "docs" / "digits.md"
    cfg = DigitsStudyConfig(seeds=(0,), runs=("rcm",), output=tmp_path / "runs", report=report, digits=TINY)
    cfg = replace(cfg, progress=False)
    rows = main(cfg)
    assert list(rows) == ["real digits (training split)", "teacher Euler 2 (cfg 1.5)", "rcm 1-step", "rcm 2-step"]
    for name, (metrics,) in rows.items():
        assert set(metrics) == {"accuracy", "fd", "precision", "recall", "fd_teacher", "recall_teacher"}, name
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), (name, metrics)
    text = report.read_text()
    assert "| rcm 2-step |" in text and "![samples per class (seed 0)](digits.png)" in text
    assert report.with_suffix(".png").stat().st_size > 1000
    report.write_text(text + "\n## Reading\n\nnotes kept\n")
    result = tmp_path / "runs" / "seed0" / "rcm" / "result.json"
    stamp = result.stat().st_mtime_ns
    assert main(cfg) == rows  # every piece reused: the same numbers, nothing rewritten
    assert result.stat().st_mtime_ns == stamp and report.read_text().endswith("## Reading\n\nnotes kept\n")
    longer = replace(cfg, digits=replace(TINY, iterations=6))  # the teacher is reused, the run is not
    with pytest.raises(ValueError, match="seed0/rcm/result.json was made with other settings"):
        main(longer)
    with pytest.raises(ValueError, match="seed0/teacher/result.json was made with other settings"):
        main(replace(cfg, digits=replace(TINY, guidance=2.0)))


def test_real_floor_draws_training_digits_with_the_held_out_labels():
    world = world_lib.DigitsWorld(TINY, world_lib.digits.load_digits_split(), None, None, None, None)
    floor = world_lib.real_floor(world, seed=3)
    dist = torch.cdist(floor.reshape(-1, 64), world.split.train_x.reshape(-1, 64))
    assert dist.min(1).values.max() == 0.0  # every row is a training digit ...
    assert torch.equal(world.split.train_y[dist.argmin(1)], world.split.held_y)  # ... of the held-out row's class
    assert not torch.equal(floor, world_lib.real_floor(world, seed=4))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"runs": ("dmd:0.1",)}, "expected scm, dmd, rcm"),
        ({"seeds": ()}, "at least one seed"),
        ({"per_class": 0}, ">= 1"),
    ],
)
def test_bad_study_settings_fail_at_config_time(overrides, message):
    with pytest.raises(ValueError, match=message):
        DigitsStudyConfig(**overrides)


def test_cli_flags_match_snapshot():
    """The CLI changes only on purpose: update tests/entrypoints/digits_study_flags.txt with the change."""
    flags = cli_flags("entrypoints.digits_study")
    snapshot = Path(__file__).with_name("digits_study_flags.txt")
    assert flags == snapshot.read_text().split(), "\n".join(flags)


def test_the_digits_study_keeps_the_official_rollouts_it_was_measured_with():
    """The mixture toy's preset steps its DMD rollouts through its mid times; the digits study pins the
    official drawn times and 4-step cycle that docs/digits.md was measured with."""
    for method in ("rcm", "dmd"):
        loss = world_lib.loop_settings(TINY, method, 0).loss
        assert (loss.dmd_fix_timesteps, loss.max_rollout_steps) == (False, 4)


def test_the_toy_studies_keep_the_ema_length_they_were_measured_with():
    """The mixture toy's preset moved to the official EMA length 0.1; the digits and experts studies keep 0.05."""
    assert get_preset("toy").optim.ema_rate == 0.1
    for method in ("rcm", "dmd", "scm"):
        assert world_lib.loop_settings(TINY, method, 0).optim.ema_rate == 0.05
    assert experts_toy_study.loop_config(experts_toy_study.ExpertsStudyConfig(), 0).optim.ema_rate == 0.05


def test_the_digits_students_are_sampled_at_the_mid_times_they_were_measured_with(monkeypatch):
    """The mixture toy's preset moved its mid times to (1.0, 0.8, 0.5); docs/digits.md was measured with
    (1.1, 0.9, 0.6), and its DMD rows depend on the last of them, so the digits sampler keeps them."""
    assert get_preset("toy").mid_times == (1.0, 0.8, 0.5)
    grids = []
    real = world_lib.consistency_times

    def recording(steps, sigma_max, mid_times):
        grids.append(tuple(mid_times))
        return real(steps, sigma_max, mid_times)

    monkeypatch.setattr(world_lib, "consistency_times", recording)
    world = world_lib.build_world(TINY)
    params = init_params(world.module, torch.Generator().manual_seed(0))
    rows = world_lib.student_samples(world, params, "rcm", seed=0)
    assert list(rows) == ["rcm 1-step", "rcm 2-step"]
    assert grids == [(1.1, 0.9, 0.6)] * 2
