"""What every benchmark shares: a synchronised wall-clock timer, the run's provenance, the JSON writer."""

import datetime
import json
import math
import subprocess
import sys
import time

import torch


def commit() -> str:
    """The checked-out commit (short hash), or "unknown" outside a git checkout."""
    try:
        run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return run.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_seconds(fn, device: torch.device) -> float:
    """Seconds of one call of `fn` as a user sees them: host included, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def device_busy_ms(fn, trace_path: str | None = None) -> float:
    """GPU time of one call of `fn` (the sum of its kernels' own device time), with an optional Chrome
    trace. Beside `wall_seconds` it says how much of a call's wall time the host adds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    if trace_path:
        prof.export_chrome_trace(trace_path)
    # Kernels only: an operator's own device time is its kernels' time again (summing both counted a
    # compiled Cosmos 2B block forward as 60 ms of device time in 34 ms of wall time).
    kernels = (e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(e.self_device_time_total for e in kernels) / 1e3


def provenance(benchmark: str, device: torch.device, commit_override: str | None = None) -> dict:
    """The fields every result starts with: which benchmark, device, date, commit, command and torch."""
    return dict(
        benchmark=benchmark,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=commit_override or commit(),
        command=" ".join(["python -m entrypoints.bench", *sys.argv[1:]]),
        torch=torch.__version__,
    )


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def write_json(result: dict, path: str | None) -> None:
    """`result` as strict JSON (a NaN or inf becomes null) at `path`; nothing when `path` is None."""
    if path:
        with open(path, "w") as f:
            json.dump(_finite_or_null(result), f, indent=1, allow_nan=False)
