"""metrics.jsonl: strict JSON, each line flushed when written, each iteration once after a resume."""

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.metrics_log import MetricsLog, json_ready


@settings(deadline=None)
@given(st.dictionaries(st.sampled_from("abcdef"), st.one_of(st.floats(), st.integers(), st.booleans(), st.text())))
def test_json_ready_is_strict_json_and_names_what_was_not_finite(metrics):
    clean = json_ready(metrics)
    text = json.dumps(clean, allow_nan=False)  # raises on a bare NaN / Infinity
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    assert json.loads(text).get("nonfinite", []) == bad
    assert all(clean[k] is None for k in bad)
    assert all(clean[k] == v for k, v in metrics.items() if k not in bad)


def test_every_line_is_on_disk_when_written(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", start=0)
    log.write({"iteration": 0, "loss": 1.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"iteration": 0, "loss": 1.5}  # not closed
    log.write({"iteration": 1, "loss": float("nan")})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1]) == {
        "iteration": 1,
        "loss": None,
        "nonfinite": ["loss"],
    }
    log.close()


def test_a_resume_drops_the_iterations_it_reruns_and_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": i}) + "\n" for i in range(6)]
    path.write_text("".join(lines) + '{"iteration": 6, "lo')  # killed mid-line
    with MetricsLog(path, start=4) as log:  # the checkpoint was at iteration 4
        log.write({"iteration": 4})
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    with MetricsLog(path, start=0):  # a fresh run starts an empty log
        pass
    assert path.read_text() == ""
