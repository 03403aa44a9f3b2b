"""entrypoints.distill on a tiny toy: every method trains, resume is bit-for-bit, bad input fails clearly."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.distill import DistillConfig, fingerprint, run
from entrypoints.toy import ToyConfig
from rcmfn.models.tiny_dit import TinyDiTConfig
from rcmfn.warm_start import WarmStartConfig

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


@pytest.mark.parametrize("method", ["rcm", "scm", "dmd", "dcm"])
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
    }[method]
    assert kinds == expected
    assert "student 4-step" in final["rows"] and (tmp_path / "samples.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["iterations"] == 6


def test_resume_continues_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(tiny_config(straight))
    run(tiny_config(resumed, iterations=3))
    run(tiny_config(resumed))  # picks up iter-00000003
    for name in ("student", "ema", "fake"):
        a = load_file(straight / "checkpoints" / "iter-00000006" / f"{name}.safetensors")
        b = load_file(resumed / "checkpoints" / "iter-00000006" / f"{name}.safetensors")
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


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    from rcmfn.train_checkpoint import latest_checkpoint

    run(tiny_config(tmp_path, iterations=3))
    partial = tmp_path / "checkpoints" / ".tmp-iter-00000006-123"
    partial.mkdir()
    (partial / "student.safetensors").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path).name == "iter-00000003"
    run(tiny_config(tmp_path))
    assert latest_checkpoint(tmp_path).name == "iter-00000006"


def test_cli_flags_match_snapshot():
    """The CLI changes only on purpose: update tests/entrypoints/distill_flags.txt with the change."""
    out = subprocess.run(
        [sys.executable, "-m", "entrypoints.distill", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": ""},
    ).stdout
    flags = sorted({word.split("=")[0].strip(",") for word in out.split() if word.startswith("--")})
    snapshot = Path(__file__).with_name("distill_flags.txt")
    assert flags == snapshot.read_text().split(), "\n".join(flags)


def test_compiled_student_and_tangent_train_like_eager(tmp_path):
    """--compile: the compiled forward and compiled jvp give the eager parameters after three iterations
    (aot_eager here for CI time; inductor was checked by hand: max |diff| 1.5e-8 after 4 iterations)."""
    from entrypoints import toy as toy_world
    from entrypoints.distill import compiled_networks, loop_config
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


def test_output_folder_probe_survives_ranks_probing_at_once(tmp_path):
    """Every torchrun rank calls prepare_output on the same folder at once; a shared probe name made
    one rank's unlink fail after another's ("No such file or directory")."""
    from concurrent.futures import ThreadPoolExecutor

    from entrypoints.distill import prepare_output

    folder = tmp_path / "run"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: prepare_output(folder), range(400)))
    assert folder.is_dir() and not list(folder.iterdir())


def test_dmd_reference_elements_reach_the_loss_from_the_preset_or_the_flag():
    """--dmd-reference-elements overrides the preset's N_ref; 0 is the official per-element DMD."""
    from entrypoints.distill import loop_config
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
    first = run(tiny_config(tmp_path, mid_times=(1.5, 1.4, 1.0)))["rows"]
    again = run(tiny_config(tmp_path, mid_times=(1.2, 1.0, 0.7)))["rows"]
    assert first["student 1-step"]["sliced_w2"] == again["student 1-step"]["sliced_w2"]
    assert first["student 2-step"]["sliced_w2"] != again["student 2-step"]["sliced_w2"]
    for bad in [(1.2, 1.0), (1.0, 1.2, 0.7), (1.6, 1.0, 0.7), (1.2, 1.0, 0.0)]:
        with pytest.raises(ValueError, match="mid_times must be"):
            tiny_config(tmp_path, mid_times=bad)


def test_toy_preset_asks_for_a_third_of_the_papers_dmd_balance_and_the_big_presets_for_the_official_loss():
    """The toy's lambda is in the paper's units (N_ref = Wan 480p): 0.3 per element on its 256 elements;
    Wan and Cosmos keep the official per-element loss with lambda 0.01."""
    from entrypoints.distill import loop_config
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
