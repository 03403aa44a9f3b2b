"""The toy's quality bar for a distilled student, checked against one run's evaluation table.

The bar of docs/toy.md ("Default run"): the student at 2 and 4 steps covers every mode, puts at most 5 % of
its samples between modes, keeps the per-class spread within 15 % of the data's, matches the mode weights
to a total variation of 0.1, and has a sliced W2 below the teacher's few-step Euler sampler and within 2x
of its many-step one. `target_misses` names each bound a run misses, so a sweep over seeds can count them.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ToyTargets:
    """Bounds on the metrics of rcmfn/toy/metrics.py for the student rows of the evaluation table."""

    students: tuple[str, ...] = ("student 2-step", "student 4-step")
    """rows of the table the bar applies to"""
    min_coverage: float = 1.0
    """share of modes that receive samples"""
    max_off_mode: float = 0.05
    """share of samples between modes"""
    spread: tuple[float, float] = (0.85, 1.15)
    """per-class spread relative to the data's: [low, high]"""
    max_weight_tv: float = 0.1
    """total variation between the student's and the data's mode weights"""
    few_step_teacher: str = "teacher Euler 4"
    """row (by prefix) whose sliced W2 the students must beat"""
    many_step_teacher: str = "teacher Euler 50"
    """row (by prefix) whose sliced W2 times `sliced_w2_factor` bounds the students'"""
    sliced_w2_factor: float = 2.0

    def __post_init__(self):
        low, high = self.spread
        if not (0 < low <= high and self.max_off_mode >= 0 and self.max_weight_tv >= 0 and self.sliced_w2_factor > 0):
            raise ValueError(f"ToyTargets: need 0 < spread low <= high and non-negative bounds; got {self}")


def _row(rows: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    found = [name for name in rows if name == prefix or name.startswith(prefix + " ")]
    if len(found) != 1:
        raise KeyError(f"the evaluation table needs one row named '{prefix} ...'; it has {sorted(rows)}")
    return rows[found[0]]


def target_misses(rows: dict[str, dict[str, float]], targets: ToyTargets = ToyTargets()) -> list[str]:
    """Each bound of `targets` that a student row of `rows` (metrics.json's "rows") misses, with its value;
    an empty list when the run meets the whole bar. A missing row is an error, not a miss."""
    few = _row(rows, targets.few_step_teacher)["sliced_w2"]
    many = _row(rows, targets.many_step_teacher)["sliced_w2"]
    low, high = targets.spread
    factor = targets.sliced_w2_factor
    misses = []
    for name in targets.students:
        m = _row(rows, name)
        checks = (
            ("coverage", m["coverage"] >= targets.min_coverage, f"< {targets.min_coverage:g}"),
            ("off_mode", m["off_mode"] <= targets.max_off_mode, f"> {targets.max_off_mode:g}"),
            ("spread", low <= m["spread"] <= high, f"outside [{low:g}, {high:g}]"),
            ("weight_tv", m["weight_tv"] <= targets.max_weight_tv, f"> {targets.max_weight_tv:g}"),
            ("sliced_w2", m["sliced_w2"] < few, f">= {few:.3f} ({targets.few_step_teacher})"),
            ("sliced_w2", m["sliced_w2"] <= factor * many, f"> {factor:g} x {many:.3f}"),
        )
        misses += [f"{name}: {metric} {m[metric]:.3f} {bound}" for metric, ok, bound in checks if not ok]
    return misses
