"""entrypoints/convert.py: checkpoints between key layouts, exactly, with clear errors (tiny nets)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from entrypoints.convert import ConvertConfig, convert
from rcmfn.models.checkpoint import CheckpointMismatchError, export_checkpoint
from rcmfn.models.cosmos import configs as cosmos_configs
from rcmfn.models.registry import get_spec
from rcmfn.models.wan import WAN_TINY, WanModel

ROOT = Path(__file__).resolve().parents[2]
TINY_WAN = get_spec("wan-tiny")
TINY_COSMOS = dataclasses.replace(get_spec("cosmos2b"), config=cosmos_configs.TINY_T2I)


def wan_weights(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random, never zero: a wrongly mapped tensor cannot match by accident."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g).to(dtype) for n, p in WanModel(WAN_TINY).state_dict().items()}


def as_ours(path: Path, spec, layout: str) -> dict[str, torch.Tensor]:
    return {spec.key_maps[layout].to_ours(k): v for k, v in load_file(path).items()}


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_official_to_diffusers_and_back_keeps_every_tensor(tmp_path_factory, seed, dtype):
    folder = tmp_path_factory.mktemp("convert")
    weights = wan_weights(seed, dtype)
    export_checkpoint(weights, folder / "official.safetensors", TINY_WAN.key_maps["official"])
    cfg = ConvertConfig(model="wan1.3b", input=folder / "official.safetensors", output=folder / "d.safetensors")
    report = convert(cfg, TINY_WAN)
    assert report.ok and len(report.loaded) == len(weights)
    diffusers = as_ours(folder / "d.safetensors", TINY_WAN, "diffusers")
    assert diffusers.keys() == weights.keys() and all(torch.equal(diffusers[n], weights[n]) for n in weights)
    back = dataclasses.replace(
        cfg, input=folder / "d.safetensors", output=folder / "o.safetensors", source_layout="diffusers",
        target_layout="official",
    )  # fmt: skip
    convert(back, TINY_WAN)
    assert load_file(folder / "o.safetensors").keys() == load_file(folder / "official.safetensors").keys()
    assert all(torch.equal(a, weights[n]) for n, a in as_ours(folder / "o.safetensors", TINY_WAN, "official").items())


def test_cosmos_release_ema_copy_converts_and_dtype_applies(tmp_path):
    """--source-layout official-ema reads a release's `net_ema.` copy; --dtype bfloat16 casts."""
    module = TINY_COSMOS.build(TINY_COSMOS.config)
    g = torch.Generator().manual_seed(3)
    net = {n: torch.randn(p.shape, generator=g) for n, p in module.state_dict().items()}
    ema = {n: t + 1 for n, t in net.items()}
    official, official_ema = TINY_COSMOS.key_maps["official"], TINY_COSMOS.key_maps["official-ema"]
    state = {official.from_ours(n): t for n, t in net.items()} | {official_ema.from_ours(n): t for n, t in ema.items()}
    torch.save(state, tmp_path / "release.pt")
    cfg = ConvertConfig(
        model="cosmos2b", input=tmp_path / "release.pt", output=tmp_path / "ema.safetensors",
        source_layout="official-ema", dtype="bfloat16",
    )  # fmt: skip
    convert(cfg, TINY_COSMOS)
    got = as_ours(tmp_path / "ema.safetensors", TINY_COSMOS, "diffusers")
    assert got.keys() == ema.keys()
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], ema[n].bfloat16()) for n in ema)


def test_bad_requests_fail_naming_the_problem_and_write_nothing(tmp_path):
    weights = wan_weights(0)
    del weights["blocks.0.ffn.0.bias"]
    source = tmp_path / "in.safetensors"
    export_checkpoint(weights, source, TINY_WAN.key_maps["official"])
    out = tmp_path / "out.safetensors"
    base = ConvertConfig(model="wan1.3b", input=source, output=out)
    cases = [
        (dict(target_layout="comfy"), ValueError, r"--target-layout: unknown key layout 'comfy'.*valid: \['diffusers'"),
        (dict(source_layout="comfy"), ValueError, "--source-layout: unknown key layout 'comfy'"),
        (dict(input=tmp_path / "nope.pt"), FileNotFoundError, "nope.pt not found"),
        (dict(output=tmp_path / "out.pt"), ValueError, r"must end in \.safetensors"),
        (dict(output=source), ValueError, "is the input"),
        ({}, CheckpointMismatchError, r"missing.*blocks\.0\.ffn\.0\.bias"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            convert(dataclasses.replace(base, **change), TINY_WAN)
        assert not out.exists()
    report = convert(dataclasses.replace(base, strict=False), TINY_WAN)
    assert report.initialised == ("blocks.0.ffn.0.bias",)
    assert torch.equal(as_ours(out, TINY_WAN, "diffusers")["blocks.0.ffn.0.bias"], torch.zeros(WAN_TINY.ffn_dim))


def test_cli_help_lists_the_options():
    out = subprocess.run(
        [sys.executable, "-m", "entrypoints.convert", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=True, env={"COLUMNS": "200", "PATH": ""},
    ).stdout  # fmt: skip
    for flag in ("--model", "--input", "--output", "--source-layout", "--target-layout", "--dtype", "--no-strict"):
        assert flag in out, flag
