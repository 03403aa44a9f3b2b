"""Where a first iteration's time goes (`bench step --breakdown`): compiler, JVP graphs, tangent calls, rest.

A restarted job's first iteration is several times its steady one (docs/benchmarks.md, "First-call cost").
This splits each iteration's wall time into what the trainer cannot avoid and what the first call adds:
- compiler: Dynamo tracing, AOT autograd and inductor (compiling or loading from the on-disk caches) of
  the per-block forwards -- the growth of `_compile.compile_inner` in torch's compile-time metrics, which
  contains all three;
- JVP graphs: tracing (make_fx over torch.func.jvp) and compiling the blocks' JVP graphs
  (parallel/block_jvp.py `trace_block_jvp`), which happen outside Dynamo;
- tangent calls: every dual-number block call (parallel/block_jvp.py `BlockJVP.dual_call`), the device
  drained around each: eager blocks on the first call of a signature, its compiled graph later;
- the rest: everything else the iteration does (its own kernels, first-touch allocation, kernel loading).
The device syncs around each tangent call perturb the timing a little: compare breakdowns with each other,
the plain rows with the plain rows.
"""

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch._dynamo.utils import compilation_time_metrics

import parallel.block_jvp as block_jvp

COMPILER_KEY = "_compile.compile_inner"


def _compiler_seconds() -> float:
    return sum(compilation_time_metrics.get(COMPILER_KEY, []))


class FirstCallClock:
    """Accumulates the JVP-graph and tangent-call seconds of the trainer's blocks while `installed`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.jvp_graph_s = 0.0
        self.tangent_call_s = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn: Callable, field: str) -> Callable:
        def run(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                setattr(self, field, getattr(self, field) + time.perf_counter() - start)

        return run

    @contextmanager
    def installed(self):
        """Time `trace_block_jvp` (looked up as a module global at call time) and `BlockJVP.dual_call`."""
        trace, dual = block_jvp.trace_block_jvp, block_jvp.BlockJVP.dual_call
        block_jvp.trace_block_jvp = self._timed(trace, "jvp_graph_s")
        block_jvp.BlockJVP.dual_call = self._timed(dual, "tangent_call_s")
        try:
            yield self
        finally:
            block_jvp.trace_block_jvp, block_jvp.BlockJVP.dual_call = trace, dual

    def measure(self, fn: Callable) -> dict:
        """Wall seconds of `fn()` (device drained before and after) and their split."""
        compiler, jvp, tangent = _compiler_seconds(), self.jvp_graph_s, self.tangent_call_s
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        split = dict(
            total_s=time.perf_counter() - start,
            compiler_s=_compiler_seconds() - compiler,
            jvp_graph_s=self.jvp_graph_s - jvp,
            tangent_call_s=self.tangent_call_s - tangent,
        )
        split["rest_s"] = split["total_s"] - split["compiler_s"] - split["jvp_graph_s"] - split["tangent_call_s"]
        return split


def breakdown_line(kind: tuple, first: dict, steady: dict | None) -> str:
    """One kind's first iteration against its steady one, each part in seconds."""
    parts = ("total_s", "compiler_s", "jvp_graph_s", "tangent_call_s", "rest_s")
    cells = [f"{first[p]:.2f}" + (f" ({steady[p]:.2f})" if steady else "") for p in parts]
    return f"| {kind[0]} | {kind[1]} | " + " | ".join(cells) + " |"


BREAKDOWN_HEADER = (
    "First iteration of each kind (steady iteration in brackets), seconds:\n"
    "| phase | rollout | total | compiler | JVP graphs | tangent calls | rest |\n|---|---|---|---|---|---|---|"
)
