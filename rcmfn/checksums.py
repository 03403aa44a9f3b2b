"""Checksums of the files of a checkpoint: written with it, verified before it is trusted.

A damaged file (a bad disk block, a copy cut short) must not resume silently into a run that trains on
garbage: checkpoints record each file's SHA-256 and a resume verifies them first, naming the file that
fails. Files are hashed in parallel threads (hashlib releases the GIL on large buffers).
"""

import hashlib
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 1 << 24


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, altered since it was written, or holds non-finite weights."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def folder_digests(folder: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under `folder` (relative POSIX paths), except the names in `skip`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip)
    with ThreadPoolExecutor(max_workers=8) as pool:
        digests = list(pool.map(file_digest, files))
    return {p.relative_to(folder).as_posix(): d for p, d in zip(files, digests, strict=True)}


def verify_digests(folder: str | Path, expected: dict[str, str]) -> None:
    """Raise CorruptCheckpointError naming the first file of `folder` that is missing or differs."""
    folder = Path(folder)
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise CorruptCheckpointError(f"checkpoint {folder}: file {missing[0]} is missing")
    names = sorted(expected)
    with ThreadPoolExecutor(max_workers=8) as pool:
        actual = list(pool.map(lambda n: file_digest(folder / n), names))
    for name, got in zip(names, actual, strict=True):
        if got != expected[name]:
            raise CorruptCheckpointError(
                f"checkpoint {folder}: file {name} was altered or damaged since it was written (checksum mismatch)"
            )


def newest_sound(candidates: list[Path], verify: Callable[[Path], None], root: Path) -> Path | None:
    """The first of `candidates` (newest first) that `verify` passes, warning for each damaged one passed
    over; None if there are none. If every candidate is damaged, raise naming the newest one's fault: a run
    never restarts from scratch without being told to (--no-resume --overwrite)."""
    faults = []
    for path in candidates:
        try:
            verify(path)
        except CorruptCheckpointError as err:
            faults.append(str(err))
            continue
        for fault in faults:
            warnings.warn(f"{fault}; resuming from the previous complete checkpoint {path.name}", stacklevel=3)
        return path
    if faults:
        raise CorruptCheckpointError(
            f"every checkpoint in {root} is damaged (newest: {faults[0]}); move them away, or start a new run "
            "with --no-resume --overwrite"
        )
    return None
