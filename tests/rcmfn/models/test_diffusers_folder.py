"""rcmfn.models.diffusers_folder: exported students load through diffusers' own from_pretrained."""

import json

import pytest
import torch

from entrypoints.presets import get_preset
from rcmfn.few_step import FewStepSettings
from rcmfn.models.diffusers_folder import INDEX_NAME, WEIGHTS_NAME, plan_shards, write_diffusers_folder
from rcmfn.models.model_card import model_card
from tests.rcmfn.models import diffusers_helpers as h

diffusers = pytest.importorskip("diffusers")

SPECS = {"wan": h.wan_spec, "cosmos": h.cosmos_spec, "cosmos-video": lambda: h.cosmos_spec(video=True)}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("shard_bytes", [10**9, 40_000], ids=["one-file", "sharded"])
def test_diffusers_from_pretrained_gives_our_output(tmp_path, name, shard_bytes):
    spec = SPECS[name]()
    params = h.poisoned(h.our_module(spec), seed=3)
    folder = write_diffusers_folder(spec, params, tmp_path / "student", card="# card\n", max_shard_bytes=shard_bytes)
    files = sorted(p.name for p in folder.iterdir())
    if shard_bytes < 10**9:
        index = json.loads((folder / INDEX_NAME).read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert set(index["weight_map"].values()) == set(files) - {"config.json", "README.md", INDEX_NAME}
    else:
        assert files == sorted(["README.md", WEIGHTS_NAME, "config.json"])
    class_name, _ = spec.diffusers_config()
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == class_name and config["_diffusers_version"]

    net = getattr(diffusers, class_name).from_pretrained(folder).float().eval()
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in params.values())
    x, r, context = h.inputs(spec)
    ref = h.diffusers_forward(spec, net, x, r, context)
    ours = h.ours_forward(spec, params, x, r, context)
    assert ref.abs().mean() > 0.3  # a live network
    assert h.max_relative_error(ours, ref) <= 1e-5


def test_a_wrong_tensor_is_seen_by_the_comparison(tmp_path):
    """Sensitivity: one block's q weight perturbed by 1 % breaks the equality the test above checks."""
    spec = h.wan_spec()
    params = h.poisoned(h.our_module(spec), seed=3)
    wrong = {**params, "blocks.1.self_attn.q.weight": params["blocks.1.self_attn.q.weight"] * 1.01}
    net = diffusers.WanTransformer3DModel.from_pretrained(write_diffusers_folder(spec, wrong, tmp_path / "w")).float()
    x, r, context = h.inputs(spec)
    assert (
        h.max_relative_error(h.ours_forward(spec, params, x, r, context), h.diffusers_forward(spec, net, x, r, context))
        > 1e-4
    )


def test_cosmos_release_eps_stays_within_1e3_of_diffusers(tmp_path):
    """cosmos-tiny as registered (release q/k eps 1e-6, diffusers fixes 1e-5): the card's stated bound."""
    spec = h.cosmos_spec(qk_norm_eps=1e-6)
    params = h.poisoned(h.our_module(spec), seed=4)
    net = diffusers.CosmosTransformer3DModel.from_pretrained(write_diffusers_folder(spec, params, tmp_path / "c"))
    x, r, context = h.inputs(spec)
    ref = h.diffusers_forward(spec, net.float(), x, r, context)
    assert (h.ours_forward(spec, params, x, r, context) - ref).abs().max() <= 1e-3


def test_rewrite_replaces_the_folder_whole_and_a_failed_write_leaves_the_old_one(tmp_path, monkeypatch):
    spec = h.wan_spec()
    params = h.poisoned(h.our_module(spec), seed=5)
    folder = write_diffusers_folder(spec, params, tmp_path / "s", max_shard_bytes=40_000)
    before = sorted(p.name for p in folder.iterdir())
    write_diffusers_folder(spec, params, folder)  # one file now: the old shards must be gone
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", WEIGHTS_NAME])
    import rcmfn.models.diffusers_folder as module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_diffusers_folder(spec, params, folder, max_shard_bytes=40_000)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", WEIGHTS_NAME])
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folder left behind
    assert len(before) > 3


def test_plan_shards_respects_the_size_and_keeps_order():
    tensors = {f"t{i}": torch.ones(n) for i, n in enumerate([3, 5, 1, 9, 2])}  # float32: 4 bytes each
    shards = plan_shards(tensors, 24)
    assert shards == [["t0"], ["t1", "t2"], ["t3"], ["t4"]]
    assert [k for s in shards for k in s] == list(tensors)
    with pytest.raises(ValueError, match="shard size"):
        plan_shards(tensors, 0)


@pytest.mark.parametrize("model", ["wan1.3b", "cosmos14b"])
def test_model_card_names_the_presets_sampler_settings(model):
    from rcmfn.models.registry import get_spec

    preset = get_preset(model)
    settings = FewStepSettings(preset.sigma_max, preset.mid_times)
    card = model_card(model, get_spec(model), settings, preset.guidance)
    assert f"sigma_max: {preset.sigma_max:g}" in card
    assert str(list(preset.mid_times)) in card
    assert "guidance_scale = 1.0" in card and f"w = {preset.guidance:g}" in card
    assert f"steps: 1 to {len(preset.mid_times) + 1}" in card
    assert get_spec(model).diffusers_config()[0] in card
    assert f"timestep_scale={get_spec(model).timestep_scale!r}" in card  # Wan 1000.0, Cosmos 1.0


@pytest.mark.parametrize("name", ["wan", "cosmos"])
def test_rcmfn_reads_its_own_diffusers_folder_back(tmp_path, name):
    """sample --checkpoint <folder> --layout diffusers and distill's teacher loader take the folder too."""
    from rcmfn.models.registry import build_model

    spec = SPECS[name]()
    params = h.poisoned(h.our_module(spec), seed=6)
    folder = write_diffusers_folder(spec, params, tmp_path / "s", max_shard_bytes=40_000)
    module, report = build_model(spec, folder, "diffusers")
    assert report.ok and len(report.loaded) == len(params)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in params.items())
