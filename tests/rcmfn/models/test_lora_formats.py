"""rcmfn.models.lora_formats: adapters diffusers' LoRA loader and ComfyUI's naming take as they are."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from rcmfn.models.diffusers_folder import write_diffusers_folder
from rcmfn.models.lora_formats import LORA_FORMATS, LoraFactors, merge_adapter, parse_adapter
from tests.rcmfn.models import diffusers_helpers as h

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loader runs on peft

# Targets of several kinds: self / cross attention, both FFN layers, and weights outside the blocks.
BLOCK_TARGETS = ("blocks.0.self_attn.q.weight", "blocks.1.self_attn.o.weight", "blocks.0.cross_attn.k.weight",
                 "blocks.1.ffn.0.weight", "blocks.0.ffn.2.weight")  # fmt: skip
GLOBAL_TARGETS = ("head.head.weight", "text_embedding.0.weight")


def random_adapter(params, names, seed=0, alpha=5.0):
    """Ranks 2 and 3 alternating, alpha != rank so a dropped scale shows; per-target alpha on one."""
    g = torch.Generator().manual_seed(seed)
    adapter = {}
    for i, name in enumerate(names):
        out, inp = params[name].shape
        rank = 2 + i % 2
        adapter[name + ".lora_down"] = 0.3 * torch.randn(rank, inp, generator=g)
        adapter[name + ".lora_up"] = 0.3 * torch.randn(out, rank, generator=g)
    adapter[names[0] + ".alpha"] = torch.tensor(1.5)
    return parse_adapter(adapter, alpha)


@pytest.fixture(scope="module")
def wan_student(tmp_path_factory):
    spec = h.wan_spec()
    params = h.poisoned(h.our_module(spec), seed=7)
    folder = write_diffusers_folder(spec, params, tmp_path_factory.mktemp("lora") / "base")
    return spec, params, folder


def lora_output(spec, folder, lora_file):
    """diffusers' forward after WanPipeline's own LoRA reading (lora_state_dict) and load_lora_adapter."""
    net = diffusers.WanTransformer3DModel.from_pretrained(folder).float().eval()
    state = diffusers.WanPipeline.lora_state_dict(str(lora_file))
    net.load_lora_adapter(state, prefix="transformer", adapter_name="student")
    x, r, context = h.inputs(spec)
    return h.diffusers_forward(spec, net, x, r, context)


@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_diffusers_loader_with_our_lora_equals_our_merged_weights(tmp_path, wan_student, layout):
    """The diffusers file through peft, and the ComfyUI file through diffusers' reader of ComfyUI / original
    Wan LoRAs (`_convert_non_diffusers_wan_lora_to_diffusers`), both equal our net with merged weights."""
    spec, params, folder = wan_student
    names = BLOCK_TARGETS + (GLOBAL_TARGETS if layout == "diffusers" else ())
    targets = random_adapter(params, names)
    save_file(LORA_FORMATS[layout](spec, targets), str(tmp_path / "lora.safetensors"))
    ref = lora_output(spec, folder, tmp_path / "lora.safetensors")
    x, r, context = h.inputs(spec)
    merged = h.ours_forward(spec, merge_adapter(params, targets), x, r, context)
    plain = h.ours_forward(spec, params, x, r, context)
    assert h.max_relative_error(merged, plain) > 1e-2  # the adapter changes the output
    assert h.max_relative_error(merged, ref) <= 1e-5


def test_comfyui_keys_and_shapes_follow_comfys_generic_lora_format(wan_student):
    """comfy/lora.py model_lora_keys_unet maps `<state-dict name minus .weight>` to the weight for every
    `diffusion_model.*.weight`; load_lora then reads `.lora_up.weight`, `.lora_down.weight`, `.alpha`.
    ComfyUI's Wan state dict is the release's under `diffusion_model.` (comfy/ldm/wan/model.py)."""
    spec, params, _ = wan_student
    targets = random_adapter(params, BLOCK_TARGETS + GLOBAL_TARGETS, alpha=4.0)
    comfy = LORA_FORMATS["comfyui"](spec, targets)
    release_names = {spec.key_maps["official"].from_ours(n) for n in params}
    comfy_state_dict = {"diffusion_model." + n for n in release_names}
    key_map = {k[: -len(".weight")]: k for k in comfy_state_dict if k.endswith(".weight")}
    expected = {}
    for name, f in targets.items():
        base = "diffusion_model." + name[: -len(".weight")]
        assert key_map[base] == "diffusion_model." + name
        expected[base + ".lora_up.weight"] = (params[name].shape[0], f.rank)
        expected[base + ".lora_down.weight"] = (f.rank, params[name].shape[1])
        expected[base + ".alpha"] = ()
        assert comfy[base + ".alpha"].item() == f.alpha
    assert {k: tuple(v.shape) for k, v in comfy.items()} == expected
    assert "diffusion_model.blocks.0.self_attn.q.lora_up.weight" in comfy  # the brief's example name
    assert comfy["diffusion_model.blocks.0.self_attn.q.alpha"].item() == 1.5  # the per-target alpha


def test_diffusers_file_folds_the_scale_into_lora_b(wan_student):
    spec, params, _ = wan_student
    targets = random_adapter(params, BLOCK_TARGETS[:1], alpha=5.0)
    f = targets[BLOCK_TARGETS[0]]
    out = LORA_FORMATS["diffusers"](spec, targets)
    assert set(out) == {
        "transformer.blocks.0.attn1.to_q.lora_A.weight",
        "transformer.blocks.0.attn1.to_q.lora_B.weight",
    }
    torch.testing.assert_close(
        out["transformer.blocks.0.attn1.to_q.lora_B.weight"], f.up * (1.5 / 2), rtol=1e-6, atol=0
    )


def test_ours_round_trips_through_a_file(tmp_path, wan_student):
    spec, params, _ = wan_student
    targets = random_adapter(params, BLOCK_TARGETS, alpha=4.0)
    save_file(LORA_FORMATS["ours"](spec, targets), str(tmp_path / "ours.safetensors"))
    again = parse_adapter(load_file(str(tmp_path / "ours.safetensors")), alpha=None)
    assert set(again) == set(targets)
    for name, f in targets.items():
        assert again[name].alpha == pytest.approx(f.alpha)
        torch.testing.assert_close(again[name].delta(), f.delta(), rtol=0, atol=0)


def test_merge_is_w_plus_alpha_over_rank_up_down_in_float64():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    down, up = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    merged = merge_adapter({"a.weight": w, "b": w}, {"a.weight": LoraFactors(down, up, 6.0)})
    expected = w + sum(2.0 * up[:, k : k + 1] * down[k : k + 1, :] for k in range(3))  # outer products, alpha/r = 2
    torch.testing.assert_close(merged["a.weight"], expected, rtol=0, atol=1e-13)
    assert merged["b"] is w


@pytest.mark.parametrize(
    "adapter, message",
    [
        ({"x.weight.lora_down": torch.ones(2, 3)}, "no x.weight.lora_up"),
        ({"x.weight.lora_down": torch.ones(2, 3), "x.weight.lora_up": torch.ones(4, 3)}, "one rank"),
        ({"x.weight.lora_up": torch.ones(4, 2)}, "without their .lora_down"),
        ({"x.weight.lora_A": torch.ones(2, 3)}, "must end in"),
    ],
)
def test_malformed_adapters_are_refused_by_name(adapter, message):
    with pytest.raises(ValueError, match=message):
        parse_adapter(adapter)


def test_merge_refuses_unknown_or_misshaped_targets():
    f = LoraFactors(torch.ones(1, 3), torch.ones(2, 1), 1.0)
    with pytest.raises(KeyError, match="does not have"):
        merge_adapter({"a.weight": torch.ones(2, 3)}, {"b.weight": f})
    with pytest.raises(ValueError, match="delta is"):
        merge_adapter({"b.weight": torch.ones(3, 3)}, {"b.weight": f})


def test_cosmos_diffusers_lora_through_peft_equals_our_merged_weights(tmp_path):
    """The same file layout for Cosmos-Predict2 (CosmosTransformer3DModel.load_lora_adapter): attention,
    MLP, an adaLN-LoRA modulation and the final layer."""
    spec = h.cosmos_spec()
    params = h.poisoned(h.our_module(spec), seed=9)
    folder = write_diffusers_folder(spec, params, tmp_path / "base")
    names = ("blocks.0.self_attn.q_proj.weight", "blocks.1.cross_attn.v_proj.weight", "blocks.1.mlp.layer1.weight",
             "blocks.0.adaln_modulation_mlp.down.weight", "final_layer.linear.weight")  # fmt: skip
    targets = random_adapter(params, names, alpha=7.0)
    save_file(LORA_FORMATS["diffusers"](spec, targets), str(tmp_path / "lora.safetensors"))
    net = diffusers.CosmosTransformer3DModel.from_pretrained(folder).float().eval()
    net.load_lora_adapter(load_file(str(tmp_path / "lora.safetensors")), prefix="transformer")
    x, r, context = h.inputs(spec)
    ref = h.diffusers_forward(spec, net, x, r, context)
    merged = h.ours_forward(spec, merge_adapter(params, targets), x, r, context)
    assert h.max_relative_error(merged, h.ours_forward(spec, params, x, r, context)) > 1e-2
    assert h.max_relative_error(merged, ref) <= 1e-5
