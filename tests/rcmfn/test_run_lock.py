"""rcmfn.run_lock: one job per run folder; a live holder is named and refused, a dead one's lock is taken over."""

import json
import os
import socket

import pytest

from rcmfn.run_lock import LOCK_NAME, RunLockedError, run_lock
from tests.conftest import write_lock


def test_lock_holds_host_pid_and_start_and_is_released_at_the_end(tmp_path):
    with run_lock(tmp_path) as holder:
        on_disk = json.loads((tmp_path / LOCK_NAME).read_text())
        assert on_disk == holder
        assert (on_disk["host"], on_disk["pid"]) == (socket.gethostname(), os.getpid()) and on_disk["started"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_is_released_when_the_body_raises(tmp_path):
    with pytest.raises(KeyError), run_lock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_job_is_refused_naming_the_holders_host_and_pid(tmp_path, live_pid):
    holder = write_lock(tmp_path, live_pid)
    with pytest.raises(RunLockedError, match=rf"in use by another job: host {socket.gethostname()}, pid {live_pid}"):
        with run_lock(tmp_path):
            pass
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == holder  # the holder's lock is left alone


def test_a_held_lock_refuses_the_same_process_too(tmp_path):
    with run_lock(tmp_path), pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        with run_lock(tmp_path):
            pass


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, dead_pid):
    write_lock(tmp_path, dead_pid)
    with pytest.warns(UserWarning, match=f"stale lock .*pid {dead_pid}"), run_lock(tmp_path) as holder:
        assert json.loads((tmp_path / LOCK_NAME).read_text()) == holder and holder["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_from_another_host_is_never_taken_over(tmp_path, dead_pid):
    """Its pid cannot be checked from here, so even a pid that is dead on this host means nothing."""
    write_lock(tmp_path, dead_pid, host="other-host.invalid")
    with pytest.raises(RunLockedError, match=f"host other-host.invalid, pid {dead_pid}"):
        with run_lock(tmp_path):
            pass


def test_unreadable_lock_is_refused_with_a_way_out(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(RunLockedError, match="cannot be read.*delete that file"):
        with run_lock(tmp_path):
            pass


def test_release_leaves_a_lock_that_another_job_took_over(tmp_path, live_pid):
    with run_lock(tmp_path):
        other = write_lock(tmp_path, live_pid)
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other
