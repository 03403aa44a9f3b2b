"""One job per run folder: `<run>/.lock`, created atomically, names the job that holds the folder.

Two jobs writing one folder prune each other's checkpoints and interleave their metrics. A job takes the
lock before it writes anything and drops it when it ends, also by an exception. The file holds JSON
{host, pid, started}. A lock whose holder ran on this host and no longer exists (killed, out of memory)
is stale and taken over with a warning; a lock from another host cannot be checked from here, so it
stays until that job ends or someone deletes the file.
"""

import json
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """The run folder is held by another job (or by a lock file that cannot be read)."""


def _process_exists(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def is_stale(holder: dict) -> bool:
    """Whether a lock's holder is known to be gone: it ran on this host and its pid no longer exists."""
    return holder["host"] == socket.gethostname() and not _process_exists(holder["pid"])


def read_holder(path: Path) -> dict:
    """The {host, pid, started} a lock file holds; RunLockedError if it cannot be read."""
    try:
        holder = json.loads(path.read_text())
        if not isinstance(holder, dict) or not {"host", "pid", "started"} <= holder.keys():
            raise ValueError(f"missing fields in {holder!r}")
        return holder
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise RunLockedError(
            f"run folder {path.parent} has a lock file {path} that cannot be read ({err}); "
            "if no job is using the folder, delete that file"
        ) from err


def _create(path: Path, holder: dict) -> bool:
    """Create the lock file holding `holder`; False if it exists. O_EXCL makes create-if-absent one step."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(holder, file)
    except BaseException:  # a half-written lock would block the folder for good
        path.unlink(missing_ok=True)
        raise
    return True


def acquire(folder: str | os.PathLike) -> dict:
    """Take `folder`'s lock for this process; return what it holds. RunLockedError if a live job holds it.

    Two jobs that find the same stale lock at the same moment can both take it over: the window is the
    time between reading the stale file and removing it.
    """
    path = Path(folder) / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat()}
    if _create(path, me):
        return me
    holder = read_holder(path)
    if not is_stale(holder):
        raise RunLockedError(
            f"run folder {path.parent} is in use by another job: host {holder['host']}, pid {holder['pid']}, "
            f"started {holder['started']} (lock file {path}); wait for it to end or use another --output; "
            "delete the lock file only if that job is gone"
        )
    warnings.warn(
        f"taking over the stale lock {path}: pid {holder['pid']} (started {holder['started']}) no longer runs",
        stacklevel=2,
    )
    path.unlink(missing_ok=True)
    if not _create(path, me):
        raise RunLockedError(f"run folder {path.parent}: another job took over the stale lock {path} first")
    return me


def release(folder: str | os.PathLike, holder: dict) -> None:
    """Remove `folder`'s lock if it still holds `holder` (a lock taken over since is not ours to remove)."""
    path = Path(folder) / LOCK_NAME
    try:
        if json.loads(path.read_text()) == holder:
            path.unlink()
    except (OSError, ValueError):
        pass  # gone or replaced by an unreadable file: either way not ours any more


@contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[dict]:
    """Hold `folder`'s lock for the body of the `with`, released at its end or on an exception."""
    holder = acquire(folder)
    try:
        yield holder
    finally:
        release(folder, holder)
