"""`python -m entrypoints.digits_study`: sCM, DMD, rCM distilling a learned teacher on real digits -> docs/digits.md.

Per seed: train the flow-matching teacher once, sample it (Euler, CFG) at 4 / 8 / 50 steps, distil each run
(method[:lambda]) from it with the toy's loop and sample the students at 1 / 2 / 4 steps; every row is judged
against the held-out real digits (entrypoints/digits.py). Finished pieces (a seed's teacher, a run) are kept
in --output with the settings they were made with and reused; a killed run restarts from its beginning.
"""

import datetime
import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import tyro
from tensordict import TensorDict

from entrypoints import digits as world_lib
from rcmfn.atomic import write_atomically, write_json_atomically, write_text_atomically
from rcmfn.toy.digits import save_sample_grid

COLUMNS = ("accuracy", "fd", "precision", "recall", "fd_teacher", "recall_teacher")


@dataclass(frozen=True)
class DigitsStudyConfig:
    """Seeds and runs of the study, where its pieces and its report go."""

    seeds: tuple[int, ...] = (0, 1)
    """seeds of the teacher's training and of the distillations (the data split stays fixed)"""
    runs: tuple[str, ...] = ("scm", "dmd", "rcm")
    """runs as method[:dmd_weight] (method scm, dmd or rcm; lambda in the toy preset's units)"""
    output: Path = Path("runs/digits")
    """folder of the finished pieces: seed<k>/teacher.*, seed<k>/<run>/result.json, samples.pt"""
    report: Path | None = Path("docs/digits.md")
    """markdown report (its figure goes beside it as <name>.png); none if unset"""
    digits: world_lib.DigitsConfig = field(default_factory=world_lib.DigitsConfig)
    """the data, teacher, evaluator and distillation settings shared by every run"""
    per_class: int = 4
    """samples per class and row in the figure (of the first seed)"""
    cpu_threads: int = 1
    """torch intra-op CPU threads (1 on a machine whose cores other jobs share)"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self):
        if not self.seeds or not self.runs:
            raise ValueError(f"need at least one seed and one run; got {self.seeds}, {self.runs}")
        for spec in self.runs:
            method, _, weight = spec.partition(":")
            if method not in ("scm", "dmd", "rcm") or (weight and method != "rcm"):
                raise ValueError(f"run {spec!r}: expected scm, dmd, rcm or rcm:<lambda>")
        if self.cpu_threads < 1 or self.per_class < 1:
            raise ValueError(f"cpu_threads and per_class must be >= 1; got {self.cpu_threads}, {self.per_class}")


DISTILL_ONLY = {"iterations", "batch_size", "dmd_weight", "student_lr", "fake_lr", "tangent_warmup", "student_steps"}


def settings(cfg: DigitsStudyConfig, teacher: bool = False) -> dict:
    """What a stored piece must share with the study that reuses it (a teacher: all but the distillation's)."""
    values = {k: v for k, v in asdict(cfg.digits).items() if not (teacher and k in DISTILL_ONLY)}
    return json.loads(json.dumps(values, default=str))


def load_finished(path: Path, expected: dict) -> dict | None:
    """The stored result at `path` if there is one; ValueError if it was made with other settings."""
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result["settings"] != expected:
        raise ValueError(f"{path} was made with other settings; delete it or use another --output")
    return result


def save_finished(folder: Path, result: dict, samples: dict[str, torch.Tensor], params: TensorDict) -> dict:
    """Write the samples, the params, then the result (last: its presence marks the piece finished)."""
    write_atomically(folder / "samples.pt", lambda tmp: torch.save({k: v.float() for k, v in samples.items()}, tmp))
    write_atomically(folder / "params.pt", lambda tmp: torch.save(params.to_dict(), tmp))
    write_json_atomically(folder / "result.json", result, indent=2)
    return result


def teacher_piece(cfg: DigitsStudyConfig, world, seed: int) -> tuple[dict, TensorDict]:
    """Train (or reload) the seed's teacher; its samples: the real floor, the Euler sampler, the reference."""
    folder, expected = cfg.output / f"seed{seed}" / "teacher", settings(cfg, teacher=True)
    found = load_finished(folder / "result.json", expected)
    if found is not None:
        return found, TensorDict(torch.load(folder / "params.pt"), batch_size=[])
    start = time.process_time()
    params, report = world_lib.train_teacher(world, seed, cfg.progress)
    samples = {"real digits (training split)": world_lib.real_floor(world, seed)}
    samples |= world_lib.teacher_samples(world, params, seed)
    reference = world_lib.teacher_reference(world, params, seed)
    write_atomically(folder / "reference.pt", lambda tmp: torch.save(reference.float(), tmp))
    result = {"settings": expected, "cpu_seconds": time.process_time() - start} | report
    return save_finished(folder, result, samples, params), params


def run_piece(cfg: DigitsStudyConfig, world, seed: int, spec: str, teacher: TensorDict) -> dict:
    """Distil (or reload) one run of the seed; its samples: the student at each step count."""
    folder, expected = cfg.output / f"seed{seed}" / spec.replace(":", "-"), settings(cfg)
    found = load_finished(folder / "result.json", expected)
    if found is not None:
        return found
    method, _, weight = spec.partition(":")
    start = time.process_time()
    ema, report = world_lib.distill(world, teacher, method, seed, cfg.progress, float(weight) if weight else None)
    samples = world_lib.student_samples(world, ema, spec, seed)
    result = {"settings": expected, "cpu_seconds": time.process_time() - start} | report
    return save_finished(folder, result, samples, ema)


def cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({' / '.join(f'{v:.3f}' for v in values)})"


def markdown_table(rows: dict[str, list[dict]]) -> list[str]:
    lines = ["| sampler | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, per_seed in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell([m[c] for m in per_seed]) for c in COLUMNS) + " |")
    return lines


def piece_times(name: str, result: dict) -> tuple[str, float, float]:
    """(text, CPU seconds, wall seconds of the training) of a stored piece."""
    wall = result.get("teacher_seconds", result.get("distill_seconds", 0.0))
    return f"{name} {result['cpu_seconds']:.0f} / {wall:.0f}", result["cpu_seconds"], wall


def write_report(cfg: DigitsStudyConfig, rows: dict, timings: list[str], wall: float, cpu: float) -> None:
    figure = cfg.report.with_suffix(".png")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = [
        "# Digits study: sCM, DMD and rCM students of a learned flow-matching teacher on real 8x8 digits",
        "",
        f"Produced by `just digits` (`python -m entrypoints.digits_study`) on {datetime.date.today()}, commit "
        f"{commit}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); seeds {', '.join(map(str, cfg.seeds))}; {cfg.digits.iterations} "
        f"distillation iterations per run. The pieces took {cpu / 60:.1f} CPU minutes in all ({wall / 60:.1f} "
        "minutes of wall-clock training on a shared machine); per piece, CPU seconds / training wall seconds: "
        + "; ".join(timings)
        + ".",
        "",
        "Each cell: mean over seeds (the seeds' values). Metrics against the held-out real digits, in the feature "
        "space of a classifier trained on the training digits; `fd_teacher` and `recall_teacher` are the Frechet "
        "distance and k-NN recall against the teacher's own samples at its most Euler steps (fresh noise).",
        "",
        *markdown_table(rows),
        "",
        f"![samples per class (seed {cfg.seeds[0]})]({figure.name})",
        "",
    ]
    existing = cfg.report.read_text() if cfg.report.exists() else ""
    notes = existing[existing.index("## Reading") :] if "## Reading" in existing else ""
    write_text_atomically(cfg.report, "\n".join(header) + ("\n" + notes if notes else ""))


def main(cfg: DigitsStudyConfig) -> dict[str, list[dict]]:
    """Run (or reuse) every piece, then write the report and figure; returns {row: [metrics per seed]}."""
    torch.set_num_threads(cfg.cpu_threads)
    world = world_lib.build_world(cfg.digits)
    rows: dict[str, list[dict]] = {}
    timings, figure_sets, cpu, wall = [], {}, 0.0, 0.0
    for seed in cfg.seeds:
        teacher_result, teacher = teacher_piece(cfg, world, seed)
        results = [run_piece(cfg, world, seed, spec, teacher) for spec in cfg.runs]
        pieces = [piece_times("teacher", teacher_result)]
        pieces += [piece_times(spec, r) for spec, r in zip(cfg.runs, results, strict=True)]
        timings.append(f"seed {seed}: " + ", ".join(text for text, _, _ in pieces))
        cpu += sum(c for _, c, _ in pieces)
        wall += sum(w for _, _, w in pieces)
        folder = cfg.output / f"seed{seed}"
        samples = {}  # every row's samples, evaluated here: a new metric needs no retraining
        for name in ["teacher"] + [spec.replace(":", "-") for spec in cfg.runs]:
            samples |= torch.load(folder / name / "samples.pt")
        for name, metrics in world_lib.evaluate(
            world, samples, torch.load(folder / "teacher" / "reference.pt")
        ).items():
            rows.setdefault(name, []).append(metrics)
        if seed == cfg.seeds[0]:
            figure_sets = samples
    if cfg.report is not None:
        sets = {"real digits (held out)": world.split.held_x} | figure_sets
        cfg.report.parent.mkdir(parents=True, exist_ok=True)
        save_sample_grid(cfg.report.with_suffix(".png"), sets, world.split.held_y, cfg.per_class)
        write_report(cfg, rows, timings, wall, cpu)
    print("\n".join(markdown_table(rows)))
    return rows


if __name__ == "__main__":
    main(tyro.cli(DigitsStudyConfig))
