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
    assert names == ["step-00000002", "step-00000003", "step-00000004", *(f"step-000000{i}" for i in (97, 98, 99))]
    run_ids = {
        p.name: json.loads((p / "meta.json").read_text())["run_id"] for p in (tmp_path / "checkpoints").iterdir()
    }
    assert run_ids == {name: "new" if name < "step-00000010" else "old" for name in names}


def test_checkpoints_from_before_run_ids_are_kept_and_still_load(tmp_path):
    path = save_checkpoint(tmp_path, _state(5), {}, run_id="old")
    meta = json.loads((path / "meta.json").read_text())
    del meta["run_id"]
    (path / "meta.json").write_text(json.dumps(meta))
    for iteration in (6, 7, 8, 9):
        save_checkpoint(tmp_path, _state(iteration), {}, run_id="new", keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000005",
        "step-00000008",
        "step-00000009",
    ]
    assert load_checkpoint(path, _state(0), {}).iteration == 5
    assert latest_checkpoint(tmp_path).name == "step-00000009"


def test_checkpoints_of_the_earlier_layout_are_found_ordered_and_loaded(tmp_path):
    """Runs written before the shared naming (iter-N/ with state.json) still resume: found beside new
    step-N/ folders, ordered by iteration (not by name), loaded and verified."""
    from rcmfn.train_checkpoint import newest_sound_checkpoint

    new = save_checkpoint(tmp_path, _state(12), {}, run_id="r")
    old = save_checkpoint(tmp_path, _state(30), {}, run_id="r")
    legacy = old.with_name("iter-00000030")
    old.rename(legacy)
    (legacy / "meta.json").rename(legacy / "state.json")
    assert latest_checkpoint(tmp_path) == legacy and newest_sound_checkpoint(tmp_path) == legacy
    assert load_checkpoint(legacy, _state(0), {}).iteration == 30
    (legacy / "state.json").unlink()  # incomplete: the new-layout one is the newest complete checkpoint
    assert latest_checkpoint(tmp_path) == new
