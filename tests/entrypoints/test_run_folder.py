"""entrypoints.run_folder: the output folder is probed safely by many ranks; a fresh run refuses (or, told
to, clears) another run's checkpoints."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from entrypoints.run_folder import check_fresh_output, prepare_output


def test_output_folder_probe_survives_ranks_probing_at_once(tmp_path):
    """Every torchrun rank calls prepare_output on the same folder at once; a shared probe name made
    one rank's unlink fail after another's ("No such file or directory")."""
    folder = tmp_path / "run"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: prepare_output(folder), range(400)))
    assert folder.is_dir() and not list(folder.iterdir())


def test_a_fresh_run_refuses_checkpoints_of_either_runner_and_ignores_saves_in_progress(tmp_path):
    assert check_fresh_output(tmp_path / "absent", overwrite=False) == []
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000003").mkdir(parents=True)
    assert check_fresh_output(tmp_path, overwrite=False) == []
    (root / "iter-00000002").mkdir()
    (root / "step-00000004").mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path} holds 2 checkpoints \(iter-00000002 ... step-00000004\)"):
        check_fresh_output(tmp_path, overwrite=False)
    assert check_fresh_output(tmp_path, overwrite=True) == [root / "iter-00000002", root / "step-00000004"]
