"""entrypoints.distill on a tiny toy: every method trains, resume is bit-for-bit, bad input fails clearly."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints import toy as toy_world
from entrypoints.config import DistillConfig, fingerprint
from entrypoints.distill import run
from entrypoints.toy import ToyConfig
from rcmfn.run_lock import RunLockedError
from rcmfn.toy.tiny_dit import TinyDiTConfig
from rcmfn.toy.warm_start import WarmStartConfig
from tests.conftest import cli_flags, write_lock

TINY_TOY = ToyConfig(
    net=TinyDiTConfig(width=32, depth=1, heads=2, mlp_ratio=2, freq_dim=16),
    warm_start=WarmStartConfig(steps=5, batch_size=8, warmup_steps=1),
    batch_size=4,
    eval_samples=8,
)


def tiny_config(output: Path, **overrides) -> DistillConfig:
    base = dict(
        output=output,
        iterations=6,
        tangent_warmup=1,
        student_update_freq=2,
        save_every=3,
        log_every=1,
        progress=False,
        cpu_threads=1,
        toy=TINY_TOY,
    )
    return DistillConfig(**(base | overrides))


@pytest.mark.parametrize("method", ["rcm", "scm", "dmd", "dcm", "dcm+dmd"])
def test_every_method_trains_with_finite_losses_and_writes_outputs(tmp_path, method):
    final = run(tiny_config(tmp_path, method=method, tangent_warmup=0 if method == "dmd" else 1))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == list(range(6))
    losses = [v for line in lines for k, v in line.items() if k.endswith("loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    kinds = {k for line in lines for k in line if k.endswith("loss")}
    expected = {
        "rcm": {"scm_loss", "dmd_loss", "fake_score_loss"},
        "scm": {"scm_loss"},
        "dmd": {"dmd_loss", "fake_score_loss"},
        "dcm": {"dcm_loss"},
        "dcm+dmd": {"dcm_loss", "dmd_loss", "fake_score_loss"},  # the official cm_type=dcm with a fake score
    }[method]
    assert kinds == expected
    assert "student 4-step" in final["rows"] and (tmp_path / "samples.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["iterations"] == 6


def test_resume_continues_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(tiny_config(straight))
    run(tiny_config(resumed, iterations=3))
    run(tiny_config(resumed))  # picks up step-00000003
    for name in ("student", "ema", "fake"):
        a = load_file(straight / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        b = load_file(resumed / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    lines = lambda p: (p / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert lines(straight) == lines(resumed)


def test_resume_from_another_config_fails_and_keeps_checkpoints(tmp_path):
    run(tiny_config(tmp_path, iterations=3))
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="another configuration.*guidance"):
        run(tiny_config(tmp_path, guidance=3.0))
    after = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    assert before == after


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'sdxl'; choose one of toy"):
        DistillConfig(model="sdxl")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        run(tiny_config(blocker / "run"))
    with pytest.raises(ValueError, match="dmd_weight"):
        tiny_config(tmp_path, dmd_weight=-1.0)
    with pytest.raises(ValueError, match="tangent_warmup must be 0"):
        tiny_config(tmp_path, method="dmd", tangent_warmup=5)
    for bad in (0.5, 0.0, float("nan"), float("inf")):  # refused at the flag, before the run folder exists
        with pytest.raises(ValueError, match="--guidance: guidance scale must be finite and >= 1"):
            tiny_config(tmp_path / "never", guidance=bad)
    assert not (tmp_path / "never").exists()
    tiny_config(tmp_path, guidance=1.0)  # 1 = no guidance, allowed


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    from rcmfn.train_checkpoint import latest_checkpoint

    run(tiny_config(tmp_path, iterations=3))
    partial = tmp_path / "checkpoints" / ".tmp-step-00000006-123"
    partial.mkdir()
    (partial / "student.safetensors").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    run(tiny_config(tmp_path))
    assert latest_checkpoint(tmp_path).name == "step-00000006"


def test_cli_flags_match_snapshot():
    """The CLI changes only on purpose: update tests/entrypoints/distill_flags.txt with the change."""
    flags = cli_flags("entrypoints.distill")
    snapshot = Path(__file__).with_name("distill_flags.txt")
    assert flags == snapshot.read_text().split(), "\n".join(flags)


def test_compiled_student_and_tangent_train_like_eager(tmp_path):
    """--compile: the compiled forward and compiled jvp give the eager parameters after three iterations
    (aot_eager here for CI time; inductor was checked by hand: max |diff| 1.5e-8 after 4 iterations)."""
    from entrypoints import toy as toy_world
    from entrypoints.config import loop_config
    from entrypoints.toy_run import compiled_networks
    from rcmfn.loop import Networks, init_state, train_iteration

    cfg = tiny_config(tmp_path)
    lcfg = loop_config(cfg)
    world = toy_world.build_toy(cfg.toy, 0, progress=False)
    eager = Networks(world.student, world.teacher, world.mixture, world.student)
    results = []
    for nets in (eager, compiled_networks(eager, lcfg, backend="aot_eager")):
        state = init_state(world.init_params, world.init_params, lcfg)
        for _ in range(3):
            train_iteration(state, nets, toy_world.toy_batch_fn(world), lcfg)
        results.append(state.student)
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6)


def test_resume_fingerprint_ignores_how_the_teacher_is_checked_and_the_student_exported():
    """--distributed.no-strict and --distributed.export-layouts change no trained value: a run may
    resume with other values (older checkpoints lack both keys, so they still match); a teacher or a
    seed may not change."""
    base = DistillConfig(model="cosmos2b")
    export_only = dataclasses.replace(
        base, distributed=dataclasses.replace(base.distributed, strict=False, export_layouts=("diffusers",))
    )
    assert fingerprint(export_only) == fingerprint(base)
    assert "strict" not in fingerprint(base)["distributed"]
    other_teacher = dataclasses.replace(base, distributed=dataclasses.replace(base.distributed, teacher=Path("t.pt")))
    assert fingerprint(other_teacher) != fingerprint(base)
    assert fingerprint(dataclasses.replace(base, seed=base.seed + 1)) != fingerprint(base)


def test_a_second_job_on_the_output_folder_is_refused_and_writes_nothing(tmp_path, live_pid):
    holder = write_lock(tmp_path, live_pid)
    with pytest.raises(RunLockedError, match=f"in use by another job: host .*, pid {live_pid}"):
        run(tiny_config(tmp_path, iterations=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    assert json.loads((tmp_path / ".lock").read_text()) == holder


def test_the_output_lock_is_released_after_a_run_and_after_a_failure(tmp_path):
    run(tiny_config(tmp_path, iterations=3))
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(ValueError, match="another configuration"):
        run(tiny_config(tmp_path, guidance=3.0))
    assert not (tmp_path / ".lock").exists()


def test_a_run_removes_half_written_checkpoints_it_finds(tmp_path):
    partial = tmp_path / "checkpoints" / ".tmp-step-00000005-1234"
    partial.mkdir(parents=True)
    (partial / "student.safetensors").write_bytes(b"truncated")
    run(tiny_config(tmp_path, iterations=3))
    assert not partial.exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]


def test_a_failed_save_leaves_no_half_written_folder(tmp_path, monkeypatch):
    from rcmfn import train_checkpoint

    def disk_full(tensors, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(train_checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(tiny_config(tmp_path, iterations=3))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("iterations", [0, -5])
def test_iterations_below_one_fail_at_config_time(tmp_path, iterations):
    """0 used to run the preset's length and -5 to train nothing and exit 0."""
    with pytest.raises(ValueError, match=f"iterations must be >= 1.*got {iterations}"):
        tiny_config(tmp_path, iterations=iterations)


def test_resume_past_the_requested_length_fails_before_the_warm_start(tmp_path, monkeypatch):
    """A checkpoint at iteration 3 resumed with --iterations 2 would be evaluated and labelled as 2."""
    run(tiny_config(tmp_path, iterations=3))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(toy_world, "build_toy", lambda *args, **kwargs: pytest.fail("warm start ran"))
    with pytest.raises(ValueError, match="step-00000003 is at iteration 3, past the requested total of 2 iterations"):
        run(tiny_config(tmp_path, iterations=2))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def _run_ids(run_dir: Path) -> dict[str, str]:
    return {
        p.name: json.loads((p / "meta.json").read_text()).get("run_id")
        for p in sorted((run_dir / "checkpoints").glob("step-*"))
    }


@pytest.mark.parametrize("resume", [False, True])
def test_a_fresh_run_refuses_a_folder_holding_checkpoints_it_does_not_resume(tmp_path, resume):
    """--no-resume into another run's folder used to let pruning delete the new run's checkpoints (the old
    run's numbers are higher). With --resume, a folder whose checkpoints this runner cannot resume (here an
    incomplete one) is refused too."""
    run(tiny_config(tmp_path, iterations=6))
    if resume:
        for path in (tmp_path / "checkpoints").glob("step-*/meta.json"):
            path.unlink()
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    message = rf"output folder {tmp_path} holds 2 checkpoints .*--overwrite.*--resume.*another --output"
    with pytest.raises(ValueError, match=message):
        run(tiny_config(tmp_path, iterations=3, resume=resume))
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == before


def test_overwrite_removes_the_old_checkpoints_and_starts_a_new_run(tmp_path):
    run(tiny_config(tmp_path, iterations=6))
    (old_id,) = set(_run_ids(tmp_path).values())
    run(tiny_config(tmp_path, iterations=3, resume=False, overwrite=True))
    ids = _run_ids(tmp_path)
    assert list(ids) == ["step-00000003"] and ids["step-00000003"] not in (None, old_id)


def test_a_resumed_run_keeps_its_run_id(tmp_path):
    run(tiny_config(tmp_path, iterations=3))
    run(tiny_config(tmp_path, iterations=6, overwrite=True))  # resumes: --overwrite only acts on a fresh run
    ids = _run_ids(tmp_path)
    assert list(ids) == ["step-00000003", "step-00000006"] and len(set(ids.values())) == 1 and None not in ids.values()


TINY_TOY_FLAGS = [
    *("--toy.net.width 32 --toy.net.depth 1 --toy.net.heads 2 --toy.net.mlp-ratio 2 --toy.net.freq-dim 16".split()),
    *("--toy.warm-start.steps 5 --toy.warm-start.batch-size 8 --toy.warm-start.warmup-steps 1".split()),
    *("--toy.batch-size 4 --toy.eval-samples 8 --tangent-warmup 1 --student-update-freq 2".split()),
    *("--save-every 1000 --log-every 1 --no-progress".split()),
]


def test_ctrl_c_saves_at_the_next_iteration_and_the_same_command_resumes(tmp_path):
    import os
    import signal
    import time

    command = [sys.executable, "-m", "entrypoints.distill", "--output", str(tmp_path), *TINY_TOY_FLAGS]
    proc = subprocess.Popen([*command, "--iterations", "100000"], stderr=subprocess.PIPE, text=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, err[-3000:]
    assert "SIGINT: finishing iteration" in err and "Traceback" not in err, err[-3000:]
    stopped = max(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*"))
    assert f"stopped at iteration {stopped}, checkpoint saved" in err
    done = subprocess.run([*command, "--iterations", str(stopped + 2)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line)["iteration"] for line in log.read_text().splitlines()]
    assert lines == list(range(stopped + 2))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"student_lr": -1e-4}, "student_lr must be finite and >= 0"),
        ({"fake_lr": float("nan")}, "fake_lr must be finite and >= 0"),
        ({"tangent_warmup": -2}, "tangent_warmup must be finite and >= 0"),
        ({"student_update_freq": 0}, "student_update_freq must be >= 1"),
        ({"p_g_mean": float("inf")}, "p_g_mean must be finite"),
        ({"cpu_threads": -1}, "cpu_threads must be finite and >= 0"),
        ({"max_bad_steps": 0}, "max_bad_steps must be >= 1"),
        ({"ema_rate": 0.3}, "EMA rate .* must lie in"),
        ({"ema_rate": float("nan")}, "EMA rate .* must lie in"),
        ({"toy": dataclasses.replace(TINY_TOY, eval_samples=0)}, "toy.eval_samples must be >= 1"),
    ],
)
def test_bad_numeric_flags_fail_at_config_time(tmp_path, flags, message):
    """Checked when the config is built: before the toy's minutes-long warm start (some were checked only
    when the optimiser was built after it)."""
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **flags)


def test_optimiser_settings_are_checked_where_they_are_defined():
    from rcmfn.loop import OptimConfig

    for bad in ({"betas": (0.9, 1.0)}, {"eps": 0.0}, {"ema_rate": -0.1}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError):
            OptimConfig(**bad)


def test_ema_rate_reaches_the_optimiser_settings_from_the_preset_or_the_flag():
    from entrypoints.config import loop_config
    from entrypoints.presets import MODELS

    for name, preset in MODELS.items():
        assert loop_config(DistillConfig(model=name)).optim.ema_rate == preset.optim.ema_rate
    assert loop_config(DistillConfig(ema_rate=0.15)).optim.ema_rate == 0.15


def test_dmd_reference_elements_reach_the_loss_from_the_preset_or_the_flag():
    """--dmd-reference-elements overrides the preset's N_ref; 0 is the official per-element DMD."""
    from entrypoints.config import loop_config
    from entrypoints.presets import MODELS

    for name, preset in MODELS.items():
        assert loop_config(DistillConfig(model=name)).loss.dmd_reference_elements == preset.dmd_reference_elements
    assert loop_config(DistillConfig(dmd_reference_elements=0)).loss.dmd_reference_elements == 0
    assert loop_config(DistillConfig(model="cosmos2b", dmd_reference_elements=7)).loss.dmd_reference_elements == 7
    with pytest.raises(ValueError, match="dmd_reference_elements must be >= 0"):
        DistillConfig(dmd_reference_elements=-1)


def test_mid_times_set_the_evaluation_sampler_and_do_not_block_a_resume(tmp_path):
    """--mid-times changes the 2- and 4-step rows, not the 1-step one, and is not part of the checkpoint's
    fingerprint: re-running a finished run with other mid times only re-evaluates it."""
    first = run(tiny_config(tmp_path, rollout_times="drawn", mid_times=(1.5, 1.4, 1.0)))["rows"]
    again = run(tiny_config(tmp_path, rollout_times="drawn", mid_times=(1.2, 1.0, 0.7)))["rows"]
    assert first["student 1-step"]["sliced_w2"] == again["student 1-step"]["sliced_w2"]
    assert first["student 2-step"]["sliced_w2"] != again["student 2-step"]["sliced_w2"]
    for bad in [(1.2, 1.0), (1.0, 1.2, 0.7), (1.6, 1.0, 0.7), (1.2, 1.0, 0.0)]:
        with pytest.raises(ValueError, match="mid_times must be"):
            tiny_config(tmp_path, mid_times=bad)


def test_toy_preset_asks_for_a_third_of_the_papers_dmd_balance_and_the_big_presets_for_the_official_loss():
    """The toy's lambda is in the paper's units (N_ref = Wan 480p): 0.3 per element on its 256 elements;
    Wan and Cosmos keep the official per-element loss with lambda 0.01."""
    from entrypoints.config import loop_config
    from rcmfn.losses import WAN_480P_ELEMENTS, dmd_size_factor

    toy = loop_config(DistillConfig()).loss
    assert toy.dmd_reference_elements == WAN_480P_ELEMENTS
    assert toy.loss_scale_dmd / toy.loss_scale * dmd_size_factor(256, WAN_480P_ELEMENTS) == pytest.approx(
        0.3, abs=0.005
    )
    for name in ("wan1.3b", "wan14b", "cosmos2b", "cosmos14b"):
        loss = loop_config(DistillConfig(model=name)).loss
        assert (loss.loss_scale_dmd, loss.dmd_reference_elements) == (1.0, 0), name
    assert loop_config(DistillConfig(dmd_weight=0.01)).loss.loss_scale_dmd == 1.0


def test_rollout_times_and_length_reach_the_loss_from_the_preset_or_the_flags():
    """--rollout-times mid-times is the official dmd_fix_timesteps with the run's own sampler times (the
    flag's, else the preset's); --max-rollout-steps is the official max_simulation_steps_fake."""
    from entrypoints.config import loop_config
    from entrypoints.presets import MODELS

    for name, preset in MODELS.items():
        loss = loop_config(DistillConfig(model=name)).loss
        assert loss.dmd_fix_timesteps == (preset.rollout_times == "mid-times"), name
        assert (loss.max_rollout_steps, loss.backward_timesteps) == (preset.max_rollout_steps, preset.mid_times), name
    wan = loop_config(DistillConfig(model="wan1.3b", rollout_times="mid-times", max_rollout_steps=3)).loss
    assert (wan.dmd_fix_timesteps, wan.max_rollout_steps, wan.backward_timesteps) == (True, 3, (1.5, 1.4, 1.0))
    toy = loop_config(DistillConfig(rollout_times="drawn", mid_times=(1.2, 1.0, 0.7), max_rollout_steps=1)).loss
    assert (toy.dmd_fix_timesteps, toy.max_rollout_steps, toy.backward_timesteps) == (False, 1, (1.2, 1.0, 0.7))


def test_rollouts_at_mid_times_step_through_them_and_tie_the_checkpoint_to_them(tmp_path):
    """With mid-times every rollout of N steps starts at pi/2 and steps through the first N - 1 mid times
    for every sample; the mid times then train the student, so a resume with others is refused (with drawn
    times they stay evaluation-only: test_mid_times_set_the_evaluation_sampler_and_do_not_block_a_resume)."""
    import math

    from entrypoints.config import loop_config
    from rcmfn.step import draw_rollout

    mids = (1.2, 1.0, 0.7)
    loss = loop_config(tiny_config(tmp_path, rollout_times="mid-times", mid_times=mids)).loss
    gen = torch.Generator().manual_seed(3)
    for steps in (1, 2, 3, 4):
        _, times, t_d, _ = draw_rollout(steps, (5, 4, 1, 8, 8), loss, gen, "cpu")
        expected = torch.tensor([math.pi / 2, *mids[: steps - 1], 0.0], dtype=torch.float64)
        assert torch.equal(times, expected[:, None].expand(-1, 5)), steps
        assert t_d.unique().numel() == 5  # the D-time is still drawn from p_D
    drawn = draw_rollout(3, (5, 4, 1, 8, 8), loop_config(tiny_config(tmp_path, rollout_times="drawn")).loss, gen, "cpu")
    assert drawn[1][1].unique().numel() == 5

    trained = run(tiny_config(tmp_path, rollout_times="mid-times", max_rollout_steps=2, mid_times=mids))
    assert all(math.isfinite(v["sliced_w2"]) for v in trained["rows"].values())
    with pytest.raises(ValueError, match="another configuration.*mid_times"):
        run(tiny_config(tmp_path, rollout_times="mid-times", max_rollout_steps=2, mid_times=(1.1, 0.9, 0.6)))
    with pytest.raises(ValueError, match="another configuration.*max_rollout_steps"):
        run(tiny_config(tmp_path, rollout_times="mid-times", max_rollout_steps=3, mid_times=mids))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"max_rollout_steps": 0}, "max_rollout_steps must be >= 1"),
        ({"rollout_times": "mid-times", "max_rollout_steps": 5}, "5-step rollouts need 4 mid times"),
    ],
)
def test_bad_rollout_flags_fail_at_config_time(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **flags)
