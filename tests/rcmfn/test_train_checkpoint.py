"""rcmfn.train_checkpoint: pruning keeps a run's newest checkpoints and never removes another run's."""

import json

from rcmfn.loop import LoopConfig, init_state
from rcmfn.train_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tests.conftest import make_small_net


def _state(iteration: int):
    state = init_state(make_small_net()[1], None, LoopConfig())
    state.iteration = iteration
    return state


def test_pruning_removes_only_this_runs_checkpoints(tmp_path):
    """A fresh run in a folder holding a longer run's checkpoints: the old rule (keep the highest numbers)
    deleted each new checkpoint as soon as it was written."""
    for iteration in (97, 98, 99):
        save_checkpoint(tmp_path, _state(iteration), {}, run_id="old", keep=3)
    for iteration in (1, 2, 3, 4):
        save_checkpoint(tmp_path, _state(iteration), {}, run_id="new", keep=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["iter-00000002", "iter-00000003", "iter-00000004", *(f"iter-000000{i}" for i in (97, 98, 99))]
    run_ids = {
        p.name: json.loads((p / "state.json").read_text())["run_id"] for p in (tmp_path / "checkpoints").iterdir()
    }
    assert run_ids == {name: "new" if name < "iter-00000010" else "old" for name in names}


def test_checkpoints_from_before_run_ids_are_kept_and_still_load(tmp_path):
    path = save_checkpoint(tmp_path, _state(5), {}, run_id="old")
    meta = json.loads((path / "state.json").read_text())
    del meta["run_id"]
    (path / "state.json").write_text(json.dumps(meta))
    for iteration in (6, 7, 8, 9):
        save_checkpoint(tmp_path, _state(iteration), {}, run_id="new", keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "iter-00000005",
        "iter-00000008",
        "iter-00000009",
    ]
    assert load_checkpoint(path, _state(0), {}).iteration == 5
    assert latest_checkpoint(tmp_path).name == "iter-00000009"
