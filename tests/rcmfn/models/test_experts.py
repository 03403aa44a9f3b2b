"""Wan2.2 A14B's two experts: the registry entries, both experts' checkpoints in the official and diffusers
folder layouts (strict, export round trip, clear errors), and the switched pair equal to diffusers' two
transformers picked as WanPipeline picks them. Each expert's network is the Wan2.1 14B architecture, so the
Wan tests (tests/rcmfn/models/test_wan.py: diffusers equality, JVP, compile) cover the network itself."""

import dataclasses
import math

import pytest
import torch

from rcmfn.models.checkpoint import CheckpointMismatchError
from rcmfn.models.experts import EXPERT_FOLDERS, build_experts, expert_checkpoint, export_experts
from rcmfn.models.registry import MODELS, get_spec
from rcmfn.models.wan import WAN_14B, WanConfig, WanModel
from rcmfn.models.wan.keys import diffusers_to_ours
from rcmfn.precond import trigflow_denoiser
from rcmfn.switch import ExpertSwitch, switched_denoiser
from tests.rcmfn.models.test_wan import perturb_, tiny_diffusers_model

# Not the Wan tests' tiny default: 4 heads of 12 (RoPE 4/4/4), one block, text width 20, FFN narrower than D.
ODD = WanConfig(dim=48, ffn_dim=40, num_heads=4, num_layers=1, text_dim=20)
ODD_SPEC = dataclasses.replace(get_spec("wan2.2-a14b-tiny"), config=ODD, text_dim=20)


def test_registry_entry_is_two_wan14b_experts_switched_at_0875_with_guidance_4_and_3():
    spec = get_spec("wan2.2-t2v-a14b")
    assert spec.config == WAN_14B and spec.family.name == "wan" and spec.text_len == 512
    assert spec.experts == ExpertSwitch(boundary=0.875, guidance_high=4.0, guidance_low=3.0)
    assert spec.experts.trig_boundary == pytest.approx(math.atan(7.0), abs=1e-15)  # r 0.875 = sigma 7
    assert get_spec("wan2.2-a14b-tiny").experts == spec.experts
    assert all(MODELS[n].experts is None for n in MODELS if not n.startswith("wan2.2"))


def test_both_experts_build_at_real_size_on_meta():
    spec = get_spec("wan2.2-t2v-a14b")
    with torch.device("meta"):
        experts = {e: spec.build(spec.config) for e in ("high", "low")}
    counts = {e: sum(p.numel() for p in m.parameters()) for e, m in experts.items()}
    assert counts["high"] == counts["low"] and abs(counts["high"] / 14.2885e9 - 1) < 1e-4


def random_expert_weights(cfg: WanConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return perturb_({k: v.detach() for k, v in WanModel(cfg).double().named_parameters()})


@pytest.mark.parametrize("layout", ["official", "diffusers", "ours"])
def test_export_then_load_both_experts_round_trips(tmp_path, layout):
    weights = {"high": random_expert_weights(ODD, 1), "low": random_expert_weights(ODD, 2)}
    written = export_experts(weights, tmp_path, layout, ODD_SPEC)
    assert {e: p.parent.name for e, p in written.items()} == EXPERT_FOLDERS[layout]
    loaded = build_experts(ODD_SPEC, tmp_path, layout)
    for expert in ("high", "low"):
        module, report = loaded[expert]
        assert report.ok and not report.missing
        state = module.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights[expert].items())
    assert not torch.equal(loaded["high"][0].state_dict()["head.head.weight"], weights["low"]["head.head.weight"])


def test_a_missing_expert_or_a_mismatched_one_is_named(tmp_path):
    weights = {"high": random_expert_weights(ODD, 1), "low": random_expert_weights(ODD, 2)}
    export_experts(weights, tmp_path, "official", ODD_SPEC)
    with pytest.raises(FileNotFoundError, match="no high-noise expert.*transformer and transformer_2"):
        build_experts(ODD_SPEC, tmp_path, "diffusers")
    del weights["low"]["head.head.bias"]
    export_experts(weights, tmp_path / "bad", "official", ODD_SPEC)
    with pytest.raises(CheckpointMismatchError, match="(?s)low-noise expert: .*missing.*head.head.bias"):
        build_experts(ODD_SPEC, tmp_path / "bad", "official")
    with pytest.raises(ValueError, match="one network, not two experts"):
        build_experts(get_spec("wan-tiny"), tmp_path, "official")
    file_form = tmp_path / "files"
    file_form.mkdir()
    for folder in EXPERT_FOLDERS["official"].values():
        (tmp_path / folder / "diffusion_pytorch_model.safetensors").rename(file_form / f"{folder}.safetensors")
    assert expert_checkpoint(file_form, "official", "low").name == "low_noise_model.safetensors"


def odd_diffusers_model(seed: int):
    """Not the tests' default tiny net: 4 heads of 12, text width 20, FFN narrower than D, one block."""
    return tiny_diffusers_model(
        seed, num_attention_heads=4, attention_head_dim=12, text_dim=20, ffn_dim=40, num_layers=1
    )


def test_switched_pair_loaded_from_a_diffusers_folder_equals_diffusers_pipeline_choice(tmp_path):
    """transformer/ and transformer_2/ saved by diffusers, loaded by build_experts, switched at r_b: equal to
    diffusers' own transformer for timesteps >= 875 and transformer_2 below (WanPipeline's rule), float64."""
    references = {"high": odd_diffusers_model(3), "low": odd_diffusers_model(4)}
    for expert, model in references.items():
        model.save_pretrained(tmp_path / EXPERT_FOLDERS["diffusers"][expert])
    loaded = build_experts(ODD_SPEC, tmp_path, "diffusers", sinusoid_dtype=torch.float32)
    for expert in ("high", "low"):
        ours = {diffusers_to_ours(k): v for k, v in references[expert].state_dict().items()}
        assert all(torch.equal(loaded[expert][0].state_dict()[k], v) for k, v in ours.items())
    switch = ODD_SPEC.experts
    ours = switched_denoiser(
        trigflow_denoiser(ODD_SPEC.velocity_net(loaded["high"][0])),
        trigflow_denoiser(ODD_SPEC.velocity_net(loaded["low"][0])),
        switch,
    )

    def pipeline_net(params, x, c_noise, cond):  # diffusers' choice per sample: timestep >= 875 -> transformer
        out = []
        for i in range(x.shape[0]):
            model = references["high" if c_noise[i] >= 1000 * switch.boundary else "low"]
            with torch.no_grad():
                out.append(model(x[i : i + 1], c_noise[i : i + 1], cond[i : i + 1], return_dict=False)[0])
        return torch.cat(out)

    reference = trigflow_denoiser(pipeline_net)
    g = torch.Generator().manual_seed(5)
    r = torch.tensor([0.99, 0.876, 0.874, 0.3, 0.95], dtype=torch.float64)  # both sides, and at the boundary
    t = torch.atan2(r, 1 - r)
    x = torch.randn(5, 16, 3, 6, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(5, 7, 20, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = ours({"high": {}, "low": {}}, x, t, cond)
    want = reference(None, x, t, cond)
    assert want.abs().mean() > 0.5
    # Relative error of the whole output <= 1e-6; per element the SPEC-models §5 criterion of the Wan tests
    # (max |d| / (1 + |ref|) <= 1e-5: the float32 sinusoid both sides use rounds differently).
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    assert ((got - want).abs() / (1.0 + want.abs())).max().item() <= 1e-5
