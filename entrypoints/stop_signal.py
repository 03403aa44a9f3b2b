"""Stop at the next iteration boundary on SIGTERM or Ctrl-C, save, and say how long the save takes.

A scheduler's SIGTERM and a user's Ctrl-C (SIGINT) both ask the run to finish the iteration in progress,
write a checkpoint and exit; a second Ctrl-C stops at once without saving. Launchers give that save a
bounded time: torchrun kills its workers 30 s after forwarding SIGTERM unless told otherwise, which is
less than one 14B iteration plus a save (README, "Stopping a run"); the message printed at the signal
gives the last save's duration so that the grace period can be set from it.
"""

import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StopSignal:
    """Whether a stop was asked for; `last_save_s` (set by the runner) goes into the message."""

    received: list[int] = field(default_factory=list)
    last_save_s: float | None = None
    iteration: int = 0

    def __call__(self) -> bool:
        return bool(self.received)

    def handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received:  # the second Ctrl-C: stop now, no save
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received.append(signum)
        took = "unknown: no save yet" if self.last_save_s is None else f"the last took {self.last_save_s:.1f} s"
        second = "; Ctrl-C again stops without saving" if signum == signal.SIGINT else ""
        print(
            f"{signal.Signals(signum).name}: finishing iteration {self.iteration}, then saving a checkpoint "
            f"({took}){second}",
            file=sys.stderr,
            flush=True,
        )

    def timed_save(self, save) -> None:
        """Run `save()` and record how long it took."""
        start = time.perf_counter()
        save()
        self.last_save_s = time.perf_counter() - start


@contextmanager
def stop_signals():
    """Handle SIGTERM and SIGINT (main thread only) with a new StopSignal; the previous handlers return after."""
    stop = StopSignal()
    previous = {signum: signal.signal(signum, stop.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
