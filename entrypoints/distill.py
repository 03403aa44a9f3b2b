"""`python -m entrypoints.distill`: rCM / sCM / DMD / dCM distillation; with no arguments, the CPU toy.

Reading order: entrypoints/config.py (every setting and how the preset fills the unset ones), `run()`
here, then entrypoints/toy_run.py (the toy) or entrypoints/distributed.py (every other model).
"""

import os
import sys

import tyro

from entrypoints import toy as toy_world
from entrypoints.config import DistillConfig
from entrypoints.distributed import run_distributed
from entrypoints.presets import MODELS
from entrypoints.run_folder import prepare_output
from entrypoints.toy_run import run_toy
from rcmfn.divergence import DivergenceError
from rcmfn.run_lock import run_lock

__all__ = ["DistillConfig", "main", "run"]


def run(cfg: DistillConfig) -> dict:
    """Build, resume, train, evaluate; return the final metrics (also written to metrics.json). The run
    holds its output folder's lock throughout, so a second job on the folder is refused."""
    if cfg.model != "toy":
        return run_distributed(cfg)
    prepare_output(cfg.output)
    with run_lock(cfg.output):
        return run_toy(cfg)


def main() -> None:
    cfg = tyro.cli(DistillConfig, description=__doc__.splitlines()[0] + f" Models: {', '.join(MODELS)}.")
    try:
        final = run(cfg)
    except DivergenceError as err:  # a named stop, not a crash: no traceback, exit status 1
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if cfg.model != "toy" or final.get("stopped_by_signal"):
        return
    print(toy_world.format_table(final["rows"]))
    print(f"metrics: {cfg.output / 'metrics.json'}  figure: {cfg.output / 'samples.png'}")


if __name__ == "__main__":
    main()
