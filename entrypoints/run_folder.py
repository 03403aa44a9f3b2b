"""The run folder both runners write: created and proven writable, and kept to one run's checkpoints.

The lock that keeps it to one job at a time is rcmfn/run_lock.py.
"""

import tempfile
from pathlib import Path


def prepare_output(path: Path) -> None:
    """Create the run folder and prove it is writable before any work starts. The probe file has a
    unique name: every rank of a torchrun job probes the same folder at once."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"output folder {path} is not writable: {err}") from err


def check_fresh_output(path: Path, overwrite: bool) -> list[Path]:
    """A run that resumes nothing must not share its folder with another run's checkpoints (either runner's;
    their pruning and resuming would mix): refuse such a folder, or with `overwrite` return them for removal.
    Hidden entries are saves in progress or killed, not checkpoints."""
    root = path / "checkpoints"
    found = sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
    if found and not overwrite:
        raise ValueError(
            f"output folder {path} holds {len(found)} checkpoint{'s' if len(found) > 1 else ''} "
            f"({found[0].name} ... {found[-1].name}) that this run does not resume; pass --overwrite to delete "
            "them and start afresh, or resume them (--resume, with their settings) or use another --output"
        )
    return found
