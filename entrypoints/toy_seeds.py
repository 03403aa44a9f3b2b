"""`python -m entrypoints.toy_seeds --seeds 0 1 2 3 -- [distill flags]`: one toy run per seed, side by side.

Each seed is `python -m entrypoints.distill --seed S --cpu-threads K --output OUTPUT/seed-S [distill flags]`,
pinned to its own K cores where the OS allows (Linux), as many at a time as the cores hold. The table gives
each seed's 2- and 4-step students against the bar of rcmfn/toy/targets.py, the bounds each one misses,
and how many seeds meet the whole bar: one run's digits depend on the CPU and torch build (float32
training takes another path elsewhere; docs/toy.md "The same default on another machine"), so a setting
is judged over seeds. Writes OUTPUT/seeds.json. A run that fails is reported with its log's tail; the
exit status is 1 if any failed.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import tyro

from rcmfn.toy.targets import ToyTargets, target_misses

METRICS = ("weight_tv", "spread", "off_mode", "sliced_w2")


@dataclass(frozen=True)
class SeedsConfig:
    """Which seeds run, on how many cores each, and where."""

    seeds: tuple[int, ...] = (0, 1)
    """one distillation run per seed"""
    cores_per_run: int = 2
    """CPU threads (and pinned cores) of each run"""
    output: Path = Path("runs/toy_seeds")
    """folder of the runs (seed-S/ each, as distill writes them) and seeds.json"""
    targets: ToyTargets = field(default_factory=ToyTargets)
    """the bar each seed's students are checked against"""

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must name at least one seed, each once; got {self.seeds}")
        if self.cores_per_run < 1:
            raise ValueError(f"--cores-per-run must be >= 1; got {self.cores_per_run}")


def core_groups(cores: list[int], per_run: int) -> list[list[int]]:
    """Disjoint groups of `per_run` cores (at least one group, sharing the cores if there are too few)."""
    groups = [cores[i : i + per_run] for i in range(0, len(cores) - per_run + 1, per_run)]
    return groups or [cores]


def _available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@dataclass
class SeedRun:
    """One seed's distill process, its log and when it started."""

    seed: int
    proc: subprocess.Popen
    log: IO[str]
    started: float


def _start(seed: int, cores: list[int], cfg: SeedsConfig, distill_flags: list[str]) -> SeedRun:
    folder = cfg.output / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "entrypoints.distill", "--seed", str(seed), "--cpu-threads"]
    command += [str(cfg.cores_per_run), "--output", str(folder), "--no-progress", *distill_flags]
    pin = (lambda: os.sched_setaffinity(0, cores)) if hasattr(os, "sched_setaffinity") else None
    log = open(folder / "distill.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
    return SeedRun(seed, proc, log, started)


def _result(run: SeedRun, cfg: SeedsConfig) -> dict:
    seed, folder = run.seed, cfg.output / f"seed-{run.seed}"
    run.log.close()
    result = {"seed": seed, "seconds": time.perf_counter() - run.started}
    if run.proc.returncode != 0 or not (folder / "metrics.json").exists():
        tail = (folder / "distill.log").read_text().splitlines()[-5:]
        return result | {"failed": f"exit status {run.proc.returncode}: " + " | ".join(tail)}
    rows = json.loads((folder / "metrics.json").read_text())["rows"]
    students = {name: {k: rows[name][k] for k in METRICS} for name in cfg.targets.students}
    return result | {"students": students, "misses": target_misses(rows, cfg.targets)}


def run_seeds(cfg: SeedsConfig, distill_flags: list[str]) -> list[dict]:
    """Run every seed (as many at a time as there are core groups); results in seed order."""
    groups = core_groups(_available_cores(), cfg.cores_per_run)
    pending, running, results = list(cfg.seeds), {}, {}
    while pending or running:
        while pending and len(running) < len(groups):
            used = {slot for slot, _ in running.values()}
            slot = next(i for i in range(len(groups)) if i not in used)
            seed = pending.pop(0)
            running[seed] = (slot, _start(seed, groups[slot], cfg, distill_flags))
        time.sleep(0.2)
        for seed, (_, run) in list(running.items()):
            if run.proc.poll() is not None:
                del running[seed]
                results[seed] = _result(run, cfg)
                print(format_row(results[seed]), flush=True)
    return [results[s] for s in cfg.seeds]


def format_row(result: dict) -> str:
    if "failed" in result:
        return f"seed {result['seed']}: FAILED ({result['failed']})"
    cells = " | ".join(
        f"{name.removeprefix('student ')} " + " / ".join(f"{v:.3f}" for v in metrics.values())
        for name, metrics in result["students"].items()
    )
    verdict = "meets the bar" if not result["misses"] else "misses: " + "; ".join(result["misses"])
    return f"seed {result['seed']}: {cells} ({result['seconds']:.0f} s) -- {verdict}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    cfg = tyro.cli(SeedsConfig, args=argv[:split])
    print(f"seeds {list(cfg.seeds)}; per student: {' / '.join(METRICS)}", flush=True)
    results = run_seeds(cfg, argv[split + 1 :])
    met = sum(1 for r in results if "misses" in r and not r["misses"])
    failed = sum(1 for r in results if "failed" in r)
    print(f"{met} of {len(results)} seeds meet the whole bar" + (f"; {failed} failed" if failed else ""))
    report = {"config": asdict(cfg) | {"output": str(cfg.output)}, "distill_flags": argv[split + 1 :]}
    (cfg.output / "seeds.json").write_text(json.dumps(report | {"results": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
