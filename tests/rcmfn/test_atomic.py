"""rcmfn.atomic: a failed write leaves the old file and no temporary; a complete one replaces it."""

import json

import pytest

from rcmfn.atomic import write_atomically, write_json_atomically, write_text_atomically


def test_a_complete_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomically(path, {"x": [1, 2.5]}, indent=1)
    assert json.loads(path.read_text()) == {"x": [1, 2.5]}
    write_text_atomically(path, "second")
    assert path.read_text() == "second" and sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old complete content")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old complete content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_a_folder_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    from rcmfn.atomic import write_folder_atomically

    def files(names):
        return lambda tmp: [(tmp / n).write_text(n) for n in names]

    folder = write_folder_atomically(tmp_path / "f", files(["a", "b"]))
    write_folder_atomically(folder, files(["c"]))
    assert sorted(p.name for p in folder.iterdir()) == ["c"]

    def fail(tmp):
        (tmp / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(folder, fail)
    assert sorted(p.name for p in folder.iterdir()) == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
