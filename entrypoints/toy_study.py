"""`python -m entrypoints.toy_study`: sCM vs DMD vs rCM on the toy, against the exact mixture -> docs/toy.md.

Each method is one `entrypoints.distill` run (same seed, warm start and iteration count); the table has
the exact data, the teacher's Euler sampler with CFG at 4 / 8 / 50 steps, and each student at 1 / 2 / 4
steps (EMA weights), with the metrics of rcmfn/toy/metrics.py and the sampling wall time.
"""

import datetime
import platform
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import tyro

from entrypoints.distill import DistillConfig, run

COLUMNS = ("coverage", "weight_tv", "spread", "off_mode", "sliced_w2", "class_match", "seconds")


@dataclass(frozen=True)
class StudyConfig:
    """Which runs make up the study and where the report goes."""

    runs: tuple[str, ...] = ("scm", "dmd", "rcm", "rcm:0.01")
    """runs as method[:dmd_weight], or stages=<--stages value> for a staged run (e.g.
    stages=dcm:500,scm:750,rcm:1250); lambda in the toy preset's units (N_ref = Wan 480p), so rcm is the
    preset's lambda and rcm:0.01 the paper's balance"""
    output: Path = Path("runs/toy_study")
    """folder of the distillation runs (one sub-folder each; finished runs are reused)"""
    report: Path = Path("docs/toy.md")
    """markdown report to write"""
    base: DistillConfig = DistillConfig()
    """settings shared by every run (iterations, seed, toy problem, learning rates ...)"""


def run_one(spec: str, cfg: StudyConfig) -> dict:
    if spec.startswith("stages="):  # the base's settings, trained in stages (rcmfn/stages.py)
        stages = spec.removeprefix("stages=")
        name = "stages-" + stages.replace(":", "-").replace(",", "_")
        return run(replace(cfg.base, stages=stages, output=cfg.output / name, progress=False))
    method, _, weight = spec.partition(":")
    extra = {"dmd_weight": float(weight)} if weight else {}
    if method == "dmd":
        extra["tangent_warmup"] = 0
    name = spec.replace(":", "-")
    return run(replace(cfg.base, method=method, output=cfg.output / name, progress=False, **extra))


def markdown(rows: dict[str, dict]) -> list[str]:
    lines = ["| sampler | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in COLUMNS) + " |")
    return lines


def target_lines(rows: dict[str, dict], spec: str) -> list[str]:
    """The issue's targets for the rCM student, each with its measured margin."""
    teacher4 = next(v for k, v in rows.items() if k.startswith("teacher Euler 4 "))["sliced_w2"]
    teacher50 = next(v for k, v in rows.items() if k.startswith("teacher Euler 50 "))["sliced_w2"]
    out = []
    for steps in (2, 4):
        m = rows[f"{spec} {steps}-step"]
        out.append(
            f"- {spec} {steps}-step: SW {m['sliced_w2']:.4f} vs teacher-4 {teacher4:.4f} "
            f"({'beats' if m['sliced_w2'] < teacher4 else 'MISSES'}), vs 2x teacher-50 {2 * teacher50:.4f} "
            f"({'within' if m['sliced_w2'] <= 2 * teacher50 else 'MISSES'}); coverage {m['coverage']:.3f} "
            f"({'all modes' if m['coverage'] == 1 else 'MISSES'}); TV {m['weight_tv']:.4f} "
            f"({'<= 0.1' if m['weight_tv'] <= 0.1 else 'MISSES'})"
        )
    return out


def main() -> None:
    cfg = tyro.cli(StudyConfig)
    rows: dict[str, dict] = {}
    timings = {}
    for spec in cfg.runs:
        final = run_one(spec, cfg)
        for name, metrics in final["rows"].items():
            if name.startswith("student"):
                rows[name.replace("student", spec)] = metrics
            else:
                rows.setdefault(name, metrics)
        timings[spec] = final["train_seconds"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    def row_order(name: str):  # exact data, teachers by step count, then the students by name
        if name.startswith("exact"):
            return (0, "")
        if name.startswith("teacher"):
            return (1, f"{int(name.split()[2]):04d}")
        return (2, name)

    ordered = {k: rows[k] for k in sorted(rows, key=row_order)}
    report = [
        "# Toy study: sCM, DMD and rCM students against an exact Gaussian-mixture teacher",
        "",
        f"Produced by `just study` (`python -m entrypoints.toy_study`) on {datetime.date.today()}, commit "
        f"{commit}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s). {cfg.base.iterations or 'preset'} iterations per run; "
        "training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".",
        "",
        *markdown(ordered),
        "",
        "Targets (rCM student):",
        "",
        *[line for spec in cfg.runs if spec.startswith("rcm") for line in target_lines(ordered, spec)],
        "",
    ]
    cfg.report.parent.mkdir(parents=True, exist_ok=True)
    existing = cfg.report.read_text() if cfg.report.exists() else ""
    notes = existing[existing.index("## Reading") :] if "## Reading" in existing else ""
    cfg.report.write_text("\n".join(report) + ("\n" + notes if notes else ""))
    print("\n".join(report))


if __name__ == "__main__":
    main()
