"""entrypoints/convert.py --export-format diffusers-folder and --extract-lora (tiny nets)."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoints.convert import ConvertConfig, convert, extract
from entrypoints.presets import get_preset
from rcmfn.models.checkpoint import export_checkpoint
from rcmfn.models.lora_formats import merge_adapter, parse_adapter
from rcmfn.models.registry import get_spec

ROOT = Path(__file__).resolve().parents[2]
TINY_WAN = get_spec("wan-tiny")


def wan_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        module = TINY_WAN.build(TINY_WAN.config)
    return {n: torch.randn(p.shape, generator=g) for n, p in module.state_dict().items()}


def test_diffusers_folder_export_loads_in_diffusers_with_the_presets_card(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    weights = wan_weights(0)
    export_checkpoint(weights, tmp_path / "student.safetensors", TINY_WAN.key_maps["official"])
    cfg = ConvertConfig(
        model="wan-tiny", input=tmp_path / "student.safetensors", output=tmp_path / "student-diffusers",
        export_format="diffusers-folder", shard_size_gb=3e-5,
    )  # fmt: skip
    assert convert(cfg).ok
    folder = cfg.output
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # 30 kB shards of a ~100 kB net
    net = diffusers.WanTransformer3DModel.from_pretrained(folder)
    key_map = TINY_WAN.key_maps["diffusers"]
    state = net.state_dict()
    assert all(torch.equal(state[key_map.from_ours(n)], w) for n, w in weights.items())
    card = (folder / "README.md").read_text()
    preset = get_preset("wan-tiny")
    assert f"sigma_max: {preset.sigma_max:g}" in card and str(list(preset.mid_times)) in card


def test_diffusers_folder_refusals_name_the_problem(tmp_path):
    export_checkpoint(wan_weights(0), tmp_path / "s.safetensors", TINY_WAN.key_maps["official"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    base = ConvertConfig(model="wan-tiny", input=tmp_path / "s.safetensors", output=tmp_path / "out")
    folder = dataclasses.replace(base, export_format="diffusers-folder")
    cases = [
        (dataclasses.replace(folder, target_layout="official"), "writes the diffusers layout"),
        (dataclasses.replace(folder, output=tmp_path / "x.safetensors"), "must be a folder"),
        (dataclasses.replace(folder, output=tmp_path / "busy"), "no diffusers config.json"),
        (dataclasses.replace(folder, shard_size_gb=0.0), "shard-size-gb must be > 0"),
        (dataclasses.replace(base, output=tmp_path / "l.safetensors", extract_lora=2), "needs the student's --teacher"),
    ]
    for cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            convert(cfg) if not cfg.extract_lora else extract(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "s.safetensors"]
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_extract_lora_cli_writes_the_format_and_prints_errors_per_group(tmp_path):
    """A student = teacher + a rank-2 change in every block weight: rank 2 recovers it (error ~1e-7 in
    float32), the printed per-group and overall errors say so, and the ours-format file merges back."""
    teacher = wan_weights(1)
    g = torch.Generator().manual_seed(2)
    student = dict(teacher)
    for name, w in teacher.items():
        if name.startswith("blocks.") and name.endswith(".weight") and w.dim() == 2:
            student[name] = w + torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    export_checkpoint(teacher, tmp_path / "teacher.safetensors", TINY_WAN.key_maps["official"])
    export_checkpoint(student, tmp_path / "student.safetensors", TINY_WAN.key_maps["diffusers"])
    out = subprocess.run(
        [sys.executable, "-m", "entrypoints.convert", "--model", "wan-tiny", "--input", "student.safetensors",
         "--source-layout", "diffusers", "--teacher", "teacher.safetensors", "--extract-lora", "2",
         "--lora-format", "ours", "--output", "lora.safetensors"],
        cwd=tmp_path, capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""},
    ).stdout  # fmt: skip
    errors = dict(re.findall(r"^  (\S+): (\S+)$", out, re.M))
    assert set(errors) == {"self_attn.q.weight", "self_attn.k.weight", "self_attn.v.weight", "self_attn.o.weight",
                           "cross_attn.q.weight", "cross_attn.k.weight", "cross_attn.v.weight", "cross_attn.o.weight",
                           "ffn.0.weight", "ffn.2.weight", "overall"}  # fmt: skip
    assert all(float(v) < 1e-5 for v in errors.values()), out
    merged = merge_adapter(teacher, parse_adapter(load_file(tmp_path / "lora.safetensors")))
    assert all(torch.allclose(merged[n], student[n], rtol=0, atol=1e-4) for n in student)

    low = extract(ConvertConfig(
        model="wan-tiny", input=tmp_path / "student.safetensors", source_layout="diffusers",
        teacher=tmp_path / "teacher.safetensors", extract_lora=1, lora_format="comfyui",
        output=tmp_path / "comfy.safetensors",
    ))[1]  # fmt: skip
    assert 0.1 < low["overall"] < 1  # rank 1 of a rank-2 change: a real, reported loss
    keys = load_file(tmp_path / "comfy.safetensors")
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys


def test_lora_input_rewrites_an_rcmfn_adapter_in_comfyuis_names(tmp_path):
    """--lora-input: a LoRA student's adapter (our names, no alpha entries) to ComfyUI; a target the network
    lacks or a wrong shape is refused by name."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    adapter = {
        "blocks.1.cross_attn.v.weight.lora_down": torch.randn(3, 32, generator=g),
        "blocks.1.cross_attn.v.weight.lora_up": torch.randn(32, 3, generator=g),
    }
    save_file(adapter, str(tmp_path / "adapter.safetensors"))
    cfg = ConvertConfig(
        model="wan-tiny", input=tmp_path / "adapter.safetensors", output=tmp_path / "comfy.safetensors",
        lora_input=True, lora_format="comfyui", lora_alpha=6.0,
    )  # fmt: skip
    from entrypoints.convert import convert_lora

    assert convert_lora(cfg) == 1
    out = load_file(tmp_path / "comfy.safetensors")
    base = "diffusion_model.blocks.1.cross_attn.v"
    assert set(out) == {f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"}
    assert out[f"{base}.alpha"].item() == 6.0 and torch.equal(out[f"{base}.lora_up.weight"], adapter[
        "blocks.1.cross_attn.v.weight.lora_up"])  # fmt: skip
    save_file({k.replace("blocks.1", "blocks.9"): v for k, v in adapter.items()}, str(tmp_path / "far.safetensors"))
    with pytest.raises(KeyError, match=r"does not have: \['blocks.9.cross_attn.v.weight'\]"):
        convert_lora(dataclasses.replace(cfg, input=tmp_path / "far.safetensors"))
    save_file(
        {k: v[:, :16].contiguous() if "down" in k else v for k, v in adapter.items()},
        str(tmp_path / "narrow.safetensors"),
    )
    with pytest.raises(ValueError, match=r"adapter delta is \(32, 16\), weight \(32, 32\)"):
        convert_lora(dataclasses.replace(cfg, input=tmp_path / "narrow.safetensors"))
