"""Damaged checkpoints never resume silently: a checksum or finiteness failure names the file and the run
falls back to the previous complete checkpoint with a warning, or stops if none is sound."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from entrypoints.distill import run
from rcmfn.checksums import CorruptCheckpointError
from tests.entrypoints.test_distill import tiny_config


class NotAllowedOnLoad:
    """Any class outside torch's weights_only allow-list."""


def _damage(path, offset=200, count=400):
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(0)
    data[offset : offset + count] = bytes(torch.randint(0, 256, (count,), generator=g, dtype=torch.uint8).tolist())
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["student.safetensors", "optim.pt"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, name):
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    run(tiny_config(straight, iterations=9))
    run(tiny_config(damaged, iterations=6))
    _damage(damaged / "checkpoints" / "step-00000006" / name)
    with pytest.warns(
        UserWarning, match=rf"step-00000006: file {name} was altered or damaged.*previous.*step-00000003"
    ):
        run(tiny_config(damaged, iterations=9))
    for net in ("student", "ema", "fake"):
        a = load_file(straight / "checkpoints" / "step-00000009" / f"{net}.safetensors")
        b = load_file(damaged / "checkpoints" / "step-00000009" / f"{net}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), net


def test_non_finite_weights_are_refused_by_name(tmp_path):
    run(tiny_config(tmp_path, iterations=3))
    path = tmp_path / "checkpoints" / "step-00000003"
    weights = load_file(path / "ema.safetensors")
    key = sorted(weights)[0]
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, path / "ema.safetensors")
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]  # as if written before checksums: the finiteness check still stops it
    (path / "meta.json").write_text(json.dumps(meta))
    before = {p: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"every checkpoint .* is damaged .*ema.safetensors holds non-finite weights \({key}",
    ):
        run(tiny_config(tmp_path, iterations=6))
    assert {p: p.read_bytes() for p in path.iterdir()} == before


def test_an_unreadable_optimiser_file_is_named_and_never_unpickled(tmp_path):
    run(tiny_config(tmp_path, iterations=3))
    path = tmp_path / "checkpoints" / "step-00000003"
    torch.save({"student": NotAllowedOnLoad()}, path / "optim.pt")  # a pickle that weights_only refuses
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]  # as if written before checksums: the load itself must name the file
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match=r"optim.pt cannot be read \(UnpicklingError\)") as err:
        run(tiny_config(tmp_path, iterations=6))
    assert "weights_only" not in str(err.value)


def test_a_resume_ignores_settings_that_change_no_trained_value_and_names_those_that_do(tmp_path):
    run(tiny_config(tmp_path, iterations=3))
    run(tiny_config(tmp_path, iterations=4, cpu_threads=2, max_bad_steps=5))  # no error
    import dataclasses

    from tests.entrypoints.test_distill import TINY_TOY

    wider = dataclasses.replace(TINY_TOY, net=dataclasses.replace(TINY_TOY.net, width=48))
    with pytest.raises(ValueError, match=r"another configuration \(toy.net.width: checkpoint 32 vs now 48\)"):
        run(tiny_config(tmp_path, iterations=6, toy=wider))
