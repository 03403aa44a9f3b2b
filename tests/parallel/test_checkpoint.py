"""parallel.checkpoint: a resumed sharded run takes the same next steps; a killed save harms nothing.

Resume: run 3 iterations, save, run 3 more; a fresh group loads the save and runs 3: metrics,
weights, EMA, fake score and optimiser moments must agree bit for bit with the uninterrupted run.
Kill: a process saves iteration 2, then is SIGKILLed inside its next save (after the shards are
written, before the rename); the folder still resolves to iteration 2 and loads the saved values.
"""

import json
import os
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp

from parallel import checkpoint
from parallel.mesh import ParallelDims
from parallel.parallelize import ParallelConfig
from rcmfn.run_lock import RunLockedError
from tests.parallel.parallel_harness import (
    assert_same_run,
    build,
    free_port,
    init_gloo,
    loop_config,
    run_steps,
    shutdown_gloo,
    snapshot,
)

PCFG = ParallelConfig(reduce_dtype=None)


def _resume_worker(rank, world, port, run_dir, out):
    init_gloo(rank, world, port)
    dims, cfg = ParallelDims(world_size=world, dp_shard=1, cp=world), loop_config()
    nets, state, student, fake = build("wan", dims, cfg, PCFG)
    run_steps(state, nets, cfg, "wan", 3)
    checkpoint.save_checkpoint(run_dir, state, student, fake, {"loader": {"position": 3}}, "run")
    straight = {"metrics": run_steps(state, nets, cfg, "wan", 3)} | snapshot(state)

    nets, fresh, student, fake = build("wan", dims, cfg, PCFG)
    path = checkpoint.latest_checkpoint(run_dir)
    meta = checkpoint.load_checkpoint(path, fresh, student, fake)
    resumed = {"metrics": run_steps(fresh, nets, cfg, "wan", 3)} | snapshot(fresh)
    moments = [
        [opt.state[p]["exp_avg_sq"].full_tensor() for p in opt.param_groups[0]["params"]]
        for opt in (state.student_opt, fresh.student_opt)
    ]
    if rank == 0:
        torch.save({"straight": straight, "resumed": resumed, "meta": meta, "moments": moments}, out)
    shutdown_gloo()


def test_resumed_run_takes_the_same_next_steps(tmp_path):
    out = tmp_path / "out.pt"
    mp.spawn(_resume_worker, args=(2, free_port(), tmp_path / "run", out), nprocs=2)
    result = torch.load(out, weights_only=False)
    assert result["meta"]["iteration"] == 3 and result["meta"]["loader"] == {"position": 3}
    assert [m["iteration"] for m in result["resumed"]["metrics"]] == [3, 4, 5]
    assert_same_run(result["resumed"], result["straight"], "resume", rtol=0, atol=0)
    for a, b in zip(*result["moments"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _killed_worker(port, run_dir, marker):
    init_gloo(0, 1, port)
    cfg = loop_config()
    nets, state, student, fake = build("wan", ParallelDims(world_size=1), cfg, PCFG)
    run_steps(state, nets, cfg, "wan", 2)
    checkpoint.save_checkpoint(run_dir, state, student, fake, {}, "run")
    torch.save(snapshot(state), marker.with_suffix(".saved"))
    run_steps(state, nets, cfg, "wan", 1)

    def stuck_replace(src, dst):  # the commit step of the second save never finishes
        marker.write_text(str(src))
        time.sleep(600)

    checkpoint.os.replace = stuck_replace
    checkpoint.save_checkpoint(run_dir, state, student, fake, {}, "run")


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "in-save"
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_killed_worker, args=(free_port(), run_dir, marker))
    proc.start()
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the worker never reached its second save"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert (run_dir / "checkpoints" / ".tmp-step-00000003" / ".metadata").exists()  # shards were written

    path = checkpoint.latest_checkpoint(run_dir)
    assert path.name == "step-00000002"
    init_gloo(0, 1, free_port())
    try:
        cfg = loop_config()
        nets, state, student, fake = build("wan", ParallelDims(world_size=1), cfg, PCFG)
        checkpoint.load_checkpoint(path, state, student, fake)
        saved = torch.load(marker.with_suffix(".saved"), weights_only=False)
        for name in ("student", "ema", "fake"):
            for key, value in saved[name].items():
                got = getattr(state, name)[key]
                torch.testing.assert_close(got.full_tensor() if hasattr(got, "full_tensor") else got, value)
        checkpoint.save_checkpoint(run_dir, state, student, fake, {}, "run")  # a later save clears the debris
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))
        assert checkpoint.latest_checkpoint(run_dir).name == "step-00000002"
    finally:
        torch.distributed.destroy_process_group()


def _rank_zero_first_worker(rank, world, port, out):
    init_gloo(rank, world, port)
    seen = {"result": checkpoint.rank_zero_first(lambda: f"claimed by rank {torch.distributed.get_rank()}")}

    def refuse():
        raise RunLockedError("run folder /x is in use by another job: host h, pid 7")

    try:
        checkpoint.rank_zero_first(refuse)
    except RunLockedError as err:
        seen["error"] = str(err)
    torch.save(seen, out / f"rank{rank}.pt")
    shutdown_gloo()


def test_rank_zero_first_gives_every_rank_rank_zeros_result_or_error(tmp_path):
    """The output folder's lock is taken by rank 0 alone; a refusal must fail every rank with the same
    message (a rank that went on would wait forever in its next collective)."""
    mp.spawn(_rank_zero_first_worker, args=(3, free_port(), tmp_path), nprocs=3)
    for rank in range(3):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen == {"result": "claimed by rank 0", "error": "run folder /x is in use by another job: host h, pid 7"}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_pruning_removes_only_this_runs_checkpoints(tmp_path):
    """A fresh run in a folder holding a longer run's checkpoints: the old rule (keep the highest numbers)
    deleted each new checkpoint as soon as it was written. One process, no group: DCP saves locally."""
    cfg = loop_config()
    _, state, student, fake = build("wan", None, cfg, PCFG)
    root = tmp_path / "checkpoints"
    for name, run_id in [("step-00000098", "old"), ("step-00000099", "old"), ("step-00000097", None)]:
        (root / name).mkdir(parents=True)
        (root / name / "meta.json").write_text(json.dumps({} if run_id is None else {"run_id": run_id}))
    for iteration in (1, 2, 3):
        state.iteration = iteration
        checkpoint.save_checkpoint(tmp_path, state, student, fake, {}, "new", keep=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-00000002", "step-00000003", "step-00000097", "step-00000098", "step-00000099"]
    assert checkpoint.read_meta(root / "step-00000003")["run_id"] == "new"


def test_latest_checkpoint_ignores_incomplete_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step-00000004", True), ("step-00000009", False), (".tmp-step-00000012", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "meta.json").write_text("{}")
    assert checkpoint.latest_checkpoint(tmp_path) == root / "step-00000004"
    assert checkpoint.latest_checkpoint(tmp_path / "absent") is None


def test_agree_to_stop_without_a_group_is_the_local_flag():
    assert checkpoint.agree_to_stop(True, torch.device("cpu")) is True
    assert checkpoint.agree_to_stop(False, torch.device("cpu")) is False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_turn_the_flag_on_and_are_restored(signum, capsys):
    from entrypoints.stop_signal import stop_signals

    previous = signal.getsignal(signum)
    with stop_signals() as stop:
        stop.iteration, stop.last_save_s = 7, 2.5
        assert not stop()
        os.kill(os.getpid(), signum)
        assert stop()
        message = capsys.readouterr().err
        assert (
            f"{signal.Signals(signum).name}: finishing iteration 7, then saving a checkpoint (the last took 2.5 s)"
            in message
        )
        if signum == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
                os.kill(os.getpid(), signum)
    assert signal.getsignal(signum) is previous


def _saving_worker(rank, world, port, run_dir, out):
    """The same 6 iterations twice: straight, and with a save after every one (the first before the fake
    score's optimiser has stepped)."""
    init_gloo(rank, world, port)
    dims, cfg = ParallelDims(world_size=world), loop_config()
    runs = {}
    for save in (False, True):
        nets, state, student, fake = build("cosmos", dims, cfg, PCFG)
        metrics = []
        for _ in range(6):
            metrics += run_steps(state, nets, cfg, "cosmos", 1)
            if save:
                checkpoint.save_checkpoint(run_dir, state, student, fake, {}, "run", keep=1)
        runs[save] = {"metrics": metrics} | snapshot(state)
        runs[save]["steps"] = [
            int(opt.state[p]["step"])
            for opt in (state.student_opt, state.fake_opt)
            for p in opt.param_groups[0]["params"][:1]
        ]
    if rank == 0:
        torch.save(runs, out)
    shutdown_gloo()


def test_saving_does_not_change_training(tmp_path):
    out = tmp_path / "out.pt"
    mp.spawn(_saving_worker, args=(1, free_port(), tmp_path / "run", out), nprocs=1)
    runs = torch.load(out, weights_only=False)
    assert runs[True]["steps"] == runs[False]["steps"]  # no phantom optimiser step
    assert_same_run(runs[True], runs[False], "saving", rtol=0, atol=0)
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(tmp_path / "run"))
    assert meta["optimizer_states"] == ["student", "fake"]
