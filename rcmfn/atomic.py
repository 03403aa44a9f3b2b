"""The one way rcmfn writes a file: into a temporary name beside it, then renamed into place.

A reader (a resuming job, a sampler, another rank) therefore sees either the old file or the complete new
one, never a truncated one; a failed write removes its temporary file. Training-checkpoint folders are
renamed into place the same way as a whole (rcmfn/train_checkpoint.py, parallel/checkpoint.py).
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create `path` through `write(temporary_name)` and rename it into place; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only after a failure: os.replace moved it otherwise
            os.remove(tmp)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8) as the whole content of `path`, atomically."""
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | os.PathLike, value, **dump_options) -> Path:
    """`value` as JSON in `path`, atomically (`dump_options` go to json.dumps)."""
    return write_text_atomically(path, json.dumps(value, **dump_options))


def write_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create the folder `folder` through `write(temporary_folder)` and rename it into place; returns it.

    A folder already there is replaced only once the new one is complete (moved aside, then deleted), so a
    reader sees the old folder or the new one, never a half-written one; a failed write leaves no trace.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    old = None
    try:
        write(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder
