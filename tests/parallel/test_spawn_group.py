"""spawn_group retries a worker killed by a signal once, with its Python stack in a warning, and nothing else."""

import os
import signal

import pytest
import torch.multiprocessing as mp

from tests.parallel.parallel_harness import CRASH_DIR_ENV, init_gloo, shutdown_gloo, spawn_group


def _abort_on_first_attempt(rank: int, port: int, marker: str) -> None:
    init_gloo(rank, 1, port)
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGABRT)
    shutdown_gloo()


def _always_abort(rank: int, port: int) -> None:
    init_gloo(rank, 1, port)
    os.kill(os.getpid(), signal.SIGABRT)


def _python_error(rank: int, port: int, marker: str) -> None:
    with open(marker, "a") as f:
        f.write("x")
    raise ValueError("a failed check in a worker")


def test_a_worker_killed_by_a_signal_runs_again_and_its_stack_is_reported(tmp_path):
    marker = tmp_path / "crashed-once"
    with pytest.warns(UserWarning, match=r"(?s)died by SIGABRT; retrying.*_abort_on_first_attempt"):
        spawn_group(_abort_on_first_attempt, 1, lambda port: (port, str(marker)))
    assert marker.exists() and CRASH_DIR_ENV not in os.environ


def test_a_python_error_is_not_retried_and_a_second_crash_raises(tmp_path):
    marker = tmp_path / "attempts"
    with pytest.raises(mp.ProcessRaisedException, match="a failed check in a worker"):
        spawn_group(_python_error, 1, lambda port: (port, str(marker)))
    assert marker.read_text() == "x"  # one attempt only
    with pytest.warns(UserWarning, match="retrying"), pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        spawn_group(_always_abort, 1, lambda port: (port,))
