"""Tests for Wan2.1 I2V (rcmfn/models/wan/i2v.py, the image branch of model.py): equality with diffusers'
WanTransformer3DModel with image_dim / added_kv_proj_dim set, key layouts, the condition's travel through
the TrigFlow denoiser, CFG and the sCM tangent (zero tangent on the image condition).
"""

import pytest
import torch
from torch.autograd import forward_ad

from ops.attention.reference import attention_reference
from rcmfn.condition import text_of, with_text
from rcmfn.models.checkpoint import export_checkpoint, load_into_meta_module
from rcmfn.models.registry import get_spec
from rcmfn.models.wan import WAN_14B, WanConfig, WanModel, key_maps
from rcmfn.models.wan.configs import WAN_I2V_14B
from rcmfn.models.wan.i2v import IMAGE, LATENT, first_frame_mask, image_condition
from rcmfn.models.wan.keys import diffusers_to_ours, ours_to_diffusers
from rcmfn.models.wan.model import timestep_sinusoid, velocity_net
from rcmfn.precond import guided_velocity, trigflow_denoiser
from rcmfn.tangent import dual_jvp, scm_tangent
from tests.rcmfn.models.test_wan import max_relative_error, perturb_

# Not the registry's tiny I2V net: 3 heads of 16, FFN narrower than D, image states 28 wide of 7 tokens.
CFG = WanConfig(
    dim=48,
    ffn_dim=40,
    num_heads=3,
    num_layers=2,
    text_dim=20,
    in_dim=36,
    image_dim=28,
    image_tokens=7,
    condition_channels=20,
)
DIFFUSERS_TEXT_LEN = 512  # diffusers splits image from text at L - 512 (transformer_wan.py, I2V processor)


def meta_model(cfg: WanConfig = CFG, **options) -> WanModel:
    with torch.device("meta"):
        return WanModel(cfg, **options)


def random_params(cfg: WanConfig = CFG, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return perturb_({k: v.detach() for k, v in WanModel(cfg).double().named_parameters()})


def inputs(batch=2, frames=3, height=6, width=8, text_len=9, cfg=CFG, seed=1):
    """Noisy latent, timestep, and a condition TensorDict with text (zero-padded tail), image, latent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, height, width, generator=g, dtype=torch.float64)
    timestep = 1000.0 * torch.rand(batch, generator=g, dtype=torch.float64)
    text = torch.randn(batch, text_len, cfg.text_dim, generator=g, dtype=torch.float64)
    text[:, text_len - 3 :] = 0.0
    image = torch.randn(batch, cfg.image_tokens, cfg.image_dim, generator=g, dtype=torch.float64)
    video_latent = torch.randn(batch, 16, frames, height, width, generator=g, dtype=torch.float64)
    return x, timestep, image_condition(text, image, video_latent)


@pytest.fixture(scope="module")
def diffusers_and_ours():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=3,
        attention_head_dim=16,
        in_channels=36,
        out_channels=16,
        text_dim=20,
        freq_dim=256,
        ffn_dim=40,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=28,
        added_kv_proj_dim=48,
        rope_max_seq_len=1024,
    )
    reference = reference.double().eval()
    perturb_(dict(reference.named_parameters()))
    return reference, {diffusers_to_ours(k): v.detach() for k, v in reference.state_dict().items()}


def test_release_config_has_the_i2v_parameter_and_key_counts():
    """The T2V 14B plus, per block, k_img, v_img (weight, bias) and norm_k_img: 5 x 40 tensors, 2 (D^2 + D)
    + D numbers; plus img_emb (8 tensors) and a 36-channel patch embedding. 16.39 B in all."""
    i2v, t2v = meta_model(WAN_I2V_14B), meta_model(WAN_14B)
    D = WAN_14B.dim
    extra = 40 * (2 * (D * D + D) + D) + (2 * 1280 + 1280 * 1280 + 1280 + 1280 * D + D + 2 * D) + 20 * 4 * D
    count = sum(p.numel() for p in i2v.parameters())
    assert count == sum(p.numel() for p in t2v.parameters()) + extra
    assert count == pytest.approx(16.3949e9, rel=1e-4)
    assert len(i2v.state_dict()) == len(t2v.state_dict()) + 5 * 40 + 8 == 1303


def test_diffusers_key_map_is_a_bijection_onto_our_names(diffusers_and_ours):
    reference, ours = diffusers_and_ours
    names = set(dict(meta_model().named_parameters()))
    assert set(ours) == names
    assert {ours_to_diffusers(n) for n in names} == set(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert ours[diffusers_to_ours(name)].shape == tensor.shape
    assert diffusers_to_ours("blocks.3.attn2.norm_added_q.weight") is None  # diffusers ignores it too


def diffusers_forward(reference, x, timestep, cond):
    """diffusers' I2V call: condition channels after x (as its pipeline does), image states separate."""
    with torch.no_grad():
        return reference(
            hidden_states=torch.cat([x, cond[LATENT]], dim=1),
            timestep=timestep,
            encoder_hidden_states=cond["text"],
            encoder_hidden_states_image=cond[IMAGE],
            return_dict=False,
        )[0]


class Float64Sinusoid(torch.nn.Module):
    def forward(self, timestep):
        return timestep_sinusoid(timestep, 256, torch.float64)


@pytest.mark.parametrize("frames", [1, 3], ids=["image", "video"])
def test_matches_diffusers_in_float64(diffusers_and_ours, frames, monkeypatch):
    """Relative error <= 1e-6 against diffusers run in float64 throughout.

    diffusers rounds a float64 model through float32 in places: its blocks and head call `.float()` on
    the residual stream and the time projection (transformer_wan.py:472-502, :723) and its sinusoid is
    float32 (SPEC-models §5 measures 4.4e-6 from these). Here `.float()` keeps float64 tensors as they
    are and diffusers gets the float64 sinusoid (the official one, ours by default); what is left is
    its float32 RoPE table (measured 1.9e-7). The unpatched comparison is the next test.
    """
    reference, params = diffusers_and_ours
    x, timestep, cond = inputs(frames=frames, text_len=DIFFUSERS_TEXT_LEN)
    model = meta_model(attention_fn=attention_reference)
    out = velocity_net(model)(params, x, timestep, cond)
    to_float32 = torch.Tensor.float
    monkeypatch.setattr(
        torch.Tensor, "float", lambda t, *a, **k: t if t.dtype == torch.float64 else to_float32(t, *a, **k)
    )
    embedder = reference.condition_embedder
    fp32_sinusoid, embedder.timesteps_proj = embedder.timesteps_proj, Float64Sinusoid()
    try:  # not monkeypatch: its undo deletes a submodule attribute instead of restoring it
        ref = diffusers_forward(reference, x, timestep, cond)
    finally:
        embedder.timesteps_proj = fp32_sinusoid
    assert out.shape == ref.shape == x.shape
    assert ref.abs().mean() > 1.0
    assert max_relative_error(out, ref) <= 1e-6
    # The image branch matters: another image or another first-frame latent moves the output by far more.
    for key in (IMAGE, LATENT):
        other = cond.copy()
        other[key] = cond[key] + torch.randn_like(cond[key])
        assert max_relative_error(velocity_net(model)(params, x, timestep, other), ref) > 1e-2


def test_matches_unpatched_diffusers_with_float32_sinusoid(diffusers_and_ours):
    """SPEC-models §5's recipe as for T2V: diffusers as installed, our float32-sinusoid switch, <= 1e-5."""
    reference, params = diffusers_and_ours
    x, timestep, cond = inputs(frames=2, text_len=DIFFUSERS_TEXT_LEN, seed=4)
    model = meta_model(sinusoid_dtype=torch.float32, attention_fn=attention_reference)
    out = velocity_net(model)(params, x, timestep, cond)
    assert max_relative_error(out, diffusers_forward(reference, x, timestep, cond)) <= 1e-5


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_export_then_load_round_trips_in_both_layouts(tmp_path, layout):
    params = random_params()
    export_checkpoint(params, tmp_path / "m.safetensors", key_maps(CFG)[layout])
    model = meta_model()
    report = load_into_meta_module(model, tmp_path / "m.safetensors", key_maps(CFG)[layout])
    assert report.ok and len(report.loaded) == len(params)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, params[name]), name


def test_a_t2v_checkpoint_in_an_i2v_net_names_the_missing_image_keys(tmp_path):
    t2v = WanConfig(dim=48, ffn_dim=40, num_heads=3, num_layers=2, text_dim=20)
    torch.manual_seed(0)
    export_checkpoint(dict(WanModel(t2v).named_parameters()), tmp_path / "t2v.safetensors", key_maps(t2v)["official"])
    report = load_into_meta_module(meta_model(), tmp_path / "t2v.safetensors", key_maps(CFG)["official"], strict=False)
    assert "blocks.1.cross_attn.k_img.weight" in report.missing and "img_emb.proj.1.weight" in report.missing
    assert [m[0] for m in report.mismatched] == ["patch_embedding.weight"]  # 16 vs 36 input channels


def test_inputs_with_wrong_shapes_raise_value_errors():
    params, net = random_params(), velocity_net(meta_model())
    x, timestep, cond = inputs()
    no_mask = cond.copy()
    no_mask[LATENT] = cond[LATENT][:, 4:]
    few_tokens = cond.copy()
    few_tokens[IMAGE] = cond[IMAGE][:, 1:]
    for bad, message in ((no_mask, "needs condition"), (few_tokens, "needs image states")):
        with pytest.raises(ValueError, match=message):
            net(params, x, timestep, bad)
    with pytest.raises(ValueError, match="x must be"):
        net(params, torch.cat([x, cond[LATENT]], 1), timestep, cond)


def test_first_frame_mask_matches_the_official_pixel_frame_construction():
    """image2video.py:210-217 rebuilt literally for 9 pixel frames (3 latent frames)."""
    frames, T, H, W = 9, 3, 2, 5
    pixel = torch.ones(1, frames, H, W)
    pixel[:, 1:] = 0
    pixel = torch.cat([pixel[:, :1].repeat_interleave(4, dim=1), pixel[:, 1:]], dim=1)
    official = pixel.view(1, pixel.shape[1] // 4, 4, H, W).transpose(1, 2)[0]
    assert torch.equal(first_frame_mask((T, H, W)), official)


def test_samples_in_a_batch_are_independent():
    params, net = random_params(), velocity_net(meta_model())
    x, timestep, cond = inputs(batch=3)
    together = net(params, x, timestep, cond)
    for i in range(3):
        alone = net(params, x[i : i + 1], timestep[i : i + 1], cond[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-12, atol=1e-12)


def test_cfg_uncondition_keeps_the_image_condition_and_drops_the_text():
    """with_text: the official I2V passes the same clip_fea and y to both CFG calls (image2video.py:284-296)."""
    params = random_params()
    x, _, cond = inputs()
    negative = torch.randn(9, CFG.text_dim, dtype=torch.float64)
    uncond = with_text(cond, negative)
    assert torch.equal(text_of(uncond), negative.expand(2, -1, -1))
    assert uncond[IMAGE] is cond[IMAGE] and uncond[LATENT] is cond[LATENT]
    assert torch.equal(text_of(cond), cond["text"])  # the original is untouched
    denoise = trigflow_denoiser(velocity_net(meta_model()), time_dtype=torch.float64)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    guided = guided_velocity(denoise, params, x, t, cond, uncond, 4.0)
    F_c, F_u = denoise(params, x, t, cond), denoise(params, x, t, uncond)
    torch.testing.assert_close(guided, F_u + 4.0 * (F_c - F_u), rtol=1e-12, atol=1e-12)
    assert (F_c - F_u).abs().max() > 1e-3


def test_scm_tangent_equals_central_difference_with_the_condition_held_fixed():
    """The sCM tangent by torch.func.jvp through the TrigFlow-wrapped I2V net equals a float64 central
    difference of F(x + e tx, t + e tt) with the image condition fixed, i.e. the condition carries no
    tangent (SPEC-rcm §2.4)."""
    params = random_params()
    x, _, cond = inputs()
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    teacher_velocity = torch.randn_like(x)
    denoise = trigflow_denoiser(velocity_net(meta_model()), time_dtype=torch.float64)
    F, tangent = scm_tangent(denoise, params, x, t, cond, teacher_velocity)
    cos_sin = torch.cos(t) * torch.sin(t)
    tx, step = cos_sin[:, None, None, None, None] * teacher_velocity, 1e-7

    def f(sign):
        return denoise(params, x + sign * step * tx, t + sign * step * cos_sin, cond)

    central = (f(1.0) - f(-1.0)) / (2 * step)
    # Truncation falls as step^2 (time enters as 1000 r through the sinusoid): measured 6.5e-7 of max |T|
    # at step 1e-6, 7.4e-9 at 1e-7; rounding eps |F| / step stays ~1e-8.
    scale = tangent.abs().max().item()
    assert scale > 1.0
    torch.testing.assert_close(F, f(0.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, central, rtol=0.0, atol=1e-7 * scale)


def test_cross_attention_keys_and_values_carry_no_tangent():
    """Under forward-mode AD, only self-attention's keys carry a tangent: ops.attention takes its
    no-K/V-tangent path for the text and for the image keys (ops/attention/op.py)."""
    calls = []

    def spy(q, k, v):
        calls.append(tuple(forward_ad.unpack_dual(a).tangent is not None for a in (q, k, v)))
        return attention_reference(q, k, v)

    params, net = random_params(), velocity_net(meta_model(attention_fn=spy))
    x, timestep, cond = inputs()
    dual_jvp(lambda x, s: net(params, x, s, cond), (x, timestep), (torch.randn_like(x), torch.ones_like(timestep)))
    per_block = [(True, True, True), (True, False, False), (True, False, False)]  # self, text, image
    assert calls == per_block * CFG.num_layers


def test_registry_entries_share_one_network_at_two_sizes():
    """480p 832 x 480 and 720p 1280 x 720 at 81 frames (generate.py:84-85; configs/__init__.py)."""
    small, large = get_spec("wan-i2v-14b-480p"), get_spec("wan-i2v-14b-720p")
    assert small.config is large.config is WAN_I2V_14B
    assert small.pixel_shape == (81, 480, 832) and large.pixel_shape == (81, 720, 1280)
    assert small.channels == 16 and small.text_len == 512
    assert small.negative_prompt.startswith("镜头晃动，")
    tiny = get_spec("wan-i2v-tiny")
    x, timestep, cond = inputs(frames=3, height=8, width=12, cfg=tiny.config)
    module = tiny.build(tiny.config)
    out = tiny.velocity_net(module)(dict(module.named_parameters()), x.float(), timestep.float(), cond.float())
    assert out.shape == x.shape and torch.isfinite(out).all()


ONE_BLOCK = WanConfig(
    dim=32,
    ffn_dim=24,
    num_heads=2,
    num_layers=1,
    text_dim=20,
    in_dim=36,
    image_dim=12,
    image_tokens=3,
    condition_channels=20,
)


@pytest.mark.slow  # inductor compiles C++ kernels on CPU
def test_compiled_forward_and_jvp_match_eager_with_the_condition_tensordict():
    """fullgraph=True over net(params, x, t, cond) with cond a TensorDict: no graph break, same numbers."""
    params = random_params(ONE_BLOCK)
    x, timestep, cond = inputs(frames=2, height=4, width=4, text_len=5, cfg=ONE_BLOCK, seed=3)
    net = velocity_net(meta_model(ONE_BLOCK))
    tangents = (torch.randn_like(x), 10.0 * torch.randn_like(timestep))

    def jvp(x, timestep, cond, tx, tt):
        return torch.func.jvp(lambda x, s: net(params, x, s, cond), (x, timestep), (tx, tt))

    torch.testing.assert_close(
        torch.compile(net, fullgraph=True)(params, x, timestep, cond),
        net(params, x, timestep, cond),
        rtol=1e-10,
        atol=1e-10,
    )
    for a, b in zip(
        torch.compile(jvp, fullgraph=True)(x, timestep, cond, *tangents), jvp(x, timestep, cond, *tangents), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_exported_diffusers_file_loads_into_diffusers_strictly(diffusers_and_ours, tmp_path):
    """Our diffusers-layout export of an I2V net is what diffusers itself reads (strict load, same output)."""
    from safetensors.torch import load_file

    reference, params = diffusers_and_ours
    export_checkpoint(params, tmp_path / "d.safetensors", key_maps(CFG)["diffusers"])
    fresh = type(reference).from_config(reference.config).double().eval()
    fresh.load_state_dict(load_file(tmp_path / "d.safetensors"), strict=True)
    x, timestep, cond = inputs(text_len=DIFFUSERS_TEXT_LEN, seed=6)
    torch.testing.assert_close(
        diffusers_forward(fresh, x, timestep, cond), diffusers_forward(reference, x, timestep, cond)
    )


def test_diffusers_folder_of_an_i2v_net_loads_through_from_pretrained(diffusers_and_ours, tmp_path):
    """`--export-format diffusers-folder` for I2V: config.json names the image branch (image_dim, added
    K/V of width D) so that diffusers' own from_pretrained builds the I2V transformer and gives its output."""
    import dataclasses

    import diffusers

    from rcmfn.models.diffusers_folder import write_diffusers_folder

    reference, params = diffusers_and_ours
    spec = dataclasses.replace(get_spec("wan-i2v-tiny"), config=CFG)
    _, config = spec.diffusers_config()
    assert (config["image_dim"], config["added_kv_proj_dim"]) == (28, 48)
    folder = write_diffusers_folder(spec, params, tmp_path / "student", card="# card\n")
    loaded = diffusers.WanTransformer3DModel.from_pretrained(folder).double().eval()
    x, timestep, cond = inputs(text_len=DIFFUSERS_TEXT_LEN, seed=8)
    want = diffusers_forward(reference, x, timestep, cond)
    assert want.abs().mean() > 0.1
    # The folder holds float32 tensors (diffusers' default load dtype), hence float32's tolerance.
    assert max_relative_error(diffusers_forward(loaded, x, timestep, cond), want) <= 1e-5


def test_lora_attention_targets_include_the_image_keys_and_values():
    """--lora-targets attention on an I2V net adapts the image K/V projections too, in every block."""
    from rcmfn.lora import adapted_keys

    spec = get_spec("wan-i2v-tiny")
    shapes = {k: v.shape for k, v in meta_model(spec.config).state_dict().items()}
    keys = adapted_keys(shapes, spec.lora_targets, ("attention",), 2)
    blocks = spec.config.num_layers
    assert sum("_img." in k for k in keys) == 2 * blocks
    assert (
        sum(".self_attn." in k for k in keys)
        == sum(".cross_attn." in k and "_img" not in k for k in keys)
        == 4 * blocks
    )
