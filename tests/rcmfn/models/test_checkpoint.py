"""Tests for rcmfn/models/checkpoint.py: formats, strict errors, streaming into meta modules, export.

SPEC-models §2.7, §3.5, §4 (formats); STYLE example 17.
"""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from rcmfn.models.checkpoint import (
    IDENTITY,
    CheckpointMismatchError,
    KeyMap,
    export_checkpoint,
    initialise_fresh_,
    iter_checkpoint_tensors,
    load_into_meta_module,
)


class Small(nn.Module):
    """Two linears, a persistent buffer and a parameter kept fp32 under a bf16 load."""

    fp32_patterns = ("scale",)

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2, bias=False)
        self.scale = nn.Parameter(torch.ones(2))
        self.register_buffer("table", torch.arange(4.0))


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Small().state_dict().items()}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def views_of_one_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    flat = torch.cat([v.flatten() for v in state.values()])
    pieces = flat.split([v.numel() for v in state.values()])
    return {name: piece.view(v.shape) for (name, v), piece in zip(state.items(), pieces, strict=True)}


def meta_small() -> Small:
    with torch.device("meta"):
        return Small()


# The `net.` layout of rCM / Cosmos training checkpoints, with TE junk dropped.
NET = KeyMap(
    to_ours=lambda k: None if k.endswith("._extra_state") else k.removeprefix("net."),
    from_ours=lambda k: f"net.{k}",
)


def assert_loaded(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = module.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert not loaded[name].is_meta
        assert torch.equal(loaded[name].to(tensor.dtype), tensor), name


def test_export_then_load_round_trips_and_materialises_every_tensor(tmp_path):
    state = random_state()
    state = views_of_one_storage(state)  # as in a consolidated TensorDict
    export_checkpoint(state, tmp_path / "m.safetensors", NET)
    assert sorted(name for name, _ in iter_checkpoint_tensors(tmp_path / "m.safetensors")) == sorted(
        f"net.{k}" for k in state
    )
    module = meta_small()
    report = load_into_meta_module(module, tmp_path / "m.safetensors", NET)
    assert report.ok and set(report.loaded) == set(state) and not report.not_materialised
    assert_loaded(module, state)
    assert isinstance(module.inp.weight, nn.Parameter) and module.inp.weight.requires_grad
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind


def test_pt_files_are_unwrapped_from_model_state_dict_and_net_nesting(tmp_path):
    state = random_state(1)
    nested = {"model": {"state_dict": {f"net.{k}": v for k, v in state.items()}}, "step": 3}
    torch.save(nested, tmp_path / "m.pt")
    torch.save({"net": dict(state), "optimizer": {"lr": 1e-4}}, tmp_path / "n.pth")
    for file, key_map in (("m.pt", NET), ("n.pth", IDENTITY)):
        module = meta_small()
        load_into_meta_module(module, tmp_path / file, key_map)
        assert_loaded(module, state)


def test_sharded_safetensors_directory_loads_through_its_index(tmp_path):
    state = {f"net.{k}": v for k, v in random_state(2).items()}
    names = sorted(state)
    shards = {"a-00001.safetensors": names[:2], "a-00002.safetensors": names[2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "a.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file({"net.stray": torch.ones(1)}, tmp_path / "not-in-index.safetensors")  # ignored: not indexed
    module = meta_small()
    assert load_into_meta_module(module, tmp_path, NET).ok
    assert_loaded(module, {k.removeprefix("net."): v for k, v in state.items()})


def test_strict_load_names_missing_unexpected_and_misshaped_keys_before_copying(tmp_path):
    state = random_state()
    del state["out.weight"]
    state["inp.bias"] = torch.randn(6)
    state["extra"] = torch.randn(2)
    state["inp._extra_state"] = torch.randn(1)
    export_checkpoint(state, tmp_path / "bad.safetensors", NET)
    module = meta_small()
    with pytest.raises(CheckpointMismatchError) as info:
        load_into_meta_module(module, tmp_path / "bad.safetensors", NET)
    message = str(info.value)
    assert "missing" in message and "out.weight" in message
    assert "unexpected" in message and "net.extra" in message
    assert "mis-shaped" in message and "inp.bias: (6,) vs (5,)" in message
    assert "_extra_state" not in message  # dropped on purpose, not an error
    assert all(t.is_meta for t in module.state_dict().values())


def test_non_strict_load_reports_and_loads_what_fits(tmp_path):
    state = random_state()
    del state["out.weight"]
    state["extra"] = torch.randn(2)
    export_checkpoint(state, tmp_path / "part.safetensors", NET)
    module = meta_small()
    report = load_into_meta_module(module, tmp_path / "part.safetensors", NET, strict=False)
    assert not report.ok
    assert report.missing == ("out.weight",) and report.unexpected == ("net.extra",)
    assert report.not_materialised == ("out.weight",)
    assert torch.equal(module.inp.weight, state["inp.weight"])


def test_two_file_keys_for_one_tensor_and_unknown_names_are_errors(tmp_path):
    state = random_state()
    save_file(
        {**{f"net.{k}": v for k, v in state.items()}, "inp.weight": state["inp.weight"].clone()},
        tmp_path / "d.safetensors",
    )
    with pytest.raises(CheckpointMismatchError, match="duplicated"):
        load_into_meta_module(meta_small(), tmp_path / "d.safetensors", NET)

    def known_only(name: str) -> str:
        if not name.startswith("net."):
            raise KeyError(name)
        return name[4:]

    report = load_into_meta_module(
        meta_small(), tmp_path / "d.safetensors", KeyMap(known_only, NET.from_ours), strict=False
    )
    assert report.unexpected == ("inp.weight",) and report.ok is False


def test_bf16_load_keeps_fp32_patterns_and_other_dtypes(tmp_path):
    state = random_state()
    state["table"] = torch.arange(4, dtype=torch.float64)
    export_checkpoint(state, tmp_path / "m.safetensors", IDENTITY)
    module = meta_small()
    load_into_meta_module(module, tmp_path / "m.safetensors", IDENTITY, dtype=torch.bfloat16)
    assert module.scale.dtype == torch.float32
    assert module.inp.weight.dtype == module.table.dtype == torch.bfloat16
    module = meta_small()
    load_into_meta_module(module, tmp_path / "m.safetensors", IDENTITY)  # dtype=None keeps the file's
    assert module.table.dtype == torch.float64 and module.inp.weight.dtype == torch.float32


def test_shape_to_ours_reshapes_a_layout_that_stores_a_tensor_flattened(tmp_path):
    state = random_state()
    flat = {**state, "inp.weight": state["inp.weight"].reshape(-1)}
    key_map = KeyMap(
        to_ours=lambda k: k,
        from_ours=lambda k: k,
        shape_to_ours=lambda name, shape: (5, 3) if name == "inp.weight" else None,
        shape_from_ours=lambda name, shape: (15,) if name == "inp.weight" else None,
    )
    save_file(flat, tmp_path / "flat.safetensors")
    module = meta_small()
    load_into_meta_module(module, tmp_path / "flat.safetensors", key_map)
    assert_loaded(module, state)
    export_checkpoint(module.state_dict(), tmp_path / "again.safetensors", key_map)
    assert dict(iter_checkpoint_tensors(tmp_path / "again.safetensors"))["inp.weight"].shape == (15,)


def test_export_refuses_colliding_names_and_leaves_no_file(tmp_path):
    collide = KeyMap(to_ours=lambda k: k, from_ours=lambda k: "same")
    with pytest.raises(ValueError, match="same key"):
        export_checkpoint(random_state(), tmp_path / "x.safetensors", collide)
    with pytest.raises(ValueError, match=".safetensors"):
        export_checkpoint(random_state(), tmp_path / "x.pt", IDENTITY)
    assert os.listdir(tmp_path) == []


def test_unknown_format_and_missing_file_raise(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        list(iter_checkpoint_tensors(tmp_path / "m.bin"))
    with pytest.raises(FileNotFoundError):
        list(iter_checkpoint_tensors(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="no .safetensors"):
        list(iter_checkpoint_tensors(tmp_path))
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "o.pt")
    with pytest.raises(ValueError, match="no tensors"):
        list(iter_checkpoint_tensors(tmp_path / "o.pt"))


@settings(deadline=None, max_examples=15)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int64]),
)
def test_round_trip_preserves_any_shape_and_dtype(tmp_path_factory, shapes, dtype):
    """Scalars, empty tensors and odd shapes survive export -> iter_checkpoint_tensors unchanged."""
    g = torch.Generator().manual_seed(len(shapes))
    state = {f"t{i}": (torch.randn(s, generator=g) * 100).to(dtype) for i, s in enumerate(shapes)}
    path = tmp_path_factory.mktemp("rt") / "m.safetensors"
    export_checkpoint(state, path, IDENTITY)
    back = dict(iter_checkpoint_tensors(path))
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == dtype and torch.equal(back[name], tensor)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple),
    leaf=st.sampled_from(["weight", "bias", "table"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, None]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fresh_init_follows_its_rule_for_any_shape(shape, leaf, dtype, seed):
    """Biases 0, other 1-D weights 1, >= 2-D tensors N(0, 1/fan_in) (drawn from the generator), else 0
    (here the 1-D `scale`); fp32 patterns stay float32 under bf16; named tensors leave the meta device."""
    with torch.device("meta"):
        module = Small()
        module.inp.register_parameter(leaf, nn.Parameter(torch.empty(shape)))
    name = f"inp.{leaf}"
    g = torch.Generator().manual_seed(seed)
    initialise_fresh_(module, (name, "scale"), dtype, "cpu", g)
    value = module.get_parameter(name)
    assert not value.is_meta and value.shape == shape
    assert value.dtype == (dtype or torch.float32) and module.scale.dtype == torch.float32
    if len(shape) >= 2:
        fan_in = max(1, value.numel() // shape[0])
        expected = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / fan_in**0.5
        assert torch.equal(value, expected.to(value.dtype))
    elif len(shape) == 1 and leaf == "weight":
        assert torch.equal(value, torch.ones_like(value))
    else:
        assert torch.equal(value, torch.zeros_like(value))
    assert torch.equal(module.scale, torch.zeros(2))
