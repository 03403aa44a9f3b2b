"""metrics.jsonl: one strict-JSON line per logged iteration, flushed as written, never duplicated on resume.

A killed run keeps every line it logged (each is flushed); a resumed run first drops the lines of the
iterations it is about to run again (and a half-written last line), so the file holds each iteration
once. Non-finite numbers are not JSON: they are written as null and their keys listed under "nonfinite".
"""

import json
import math
import os
from pathlib import Path

from rcmfn.atomic import write_text_atomically


def json_ready(metrics: dict) -> dict:
    """`metrics` with NaN / inf floats as None, their keys listed under "nonfinite" (omitted if none)."""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    clean = {k: (None if k in bad else v) for k, v in metrics.items()}
    return clean | ({"nonfinite": bad} if bad else {})


def _kept_lines(path: Path, before_iteration: int) -> list[str]:
    """Complete lines of `path` whose iteration is below `before_iteration`."""
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # the half-written line of a killed run
        try:
            iteration = json.loads(line)["iteration"]
        except (ValueError, KeyError, TypeError):
            continue
        if iteration < before_iteration:
            kept.append(line)
    return kept


class MetricsLog:
    """Append-only metrics.jsonl for a run resumed at iteration `start` (0 for a fresh run)."""

    def __init__(self, path: str | os.PathLike, start: int):
        self.path = Path(path)
        if self.path.exists():
            write_text_atomically(self.path, "".join(_kept_lines(self.path, start)))
        self._file = open(self.path, "a")

    def write(self, metrics: dict) -> None:
        self._file.write(json.dumps(json_ready(metrics), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
