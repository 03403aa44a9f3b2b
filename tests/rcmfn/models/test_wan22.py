"""Wan2.2 TI2V-5B on the Wan model: release shapes, diffusers equality with scalar and per-token
timesteps, checkpoint layouts, JVP and compile. SPEC-models §3, §5 (the equivalence recipe)."""

import contextlib

import pytest
import torch

from ops.attention.reference import attention_reference
from rcmfn.models.checkpoint import export_checkpoint, load_into_meta_module
from rcmfn.models.registry import build_model, get_spec
from rcmfn.models.wan import WAN22_TI2V_5B, WAN22_TINY, WanModel, key_maps, velocity_net
from rcmfn.models.wan.keys import diffusers_to_ours, ours_to_diffusers
from rcmfn.models.wan.ti2v import first_frame_timesteps, keep_first_frame
from tests.rcmfn.models.test_wan import max_relative_error, perturb_

SPEC = get_spec("wan2.2-tiny")


def diffusers_kwargs(cfg) -> dict:
    """WanTransformer3DModel arguments of a WanConfig (the hub's transformer/config.json fields)."""
    return dict(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    )


ORIGINAL_FLOAT = torch.Tensor.float


@contextlib.contextmanager
def float_is(method):
    """Run with `Tensor.float` replaced by `method` (restored on exit, also on error)."""
    before = torch.Tensor.float
    torch.Tensor.float = method
    try:
        yield
    finally:
        torch.Tensor.float = before


def float_keeping_float64(tensor, *args, **kwargs):
    """`.float()` that leaves a float64 tensor as it is."""
    return tensor if tensor.dtype == torch.float64 else ORIGINAL_FLOAT(tensor, *args, **kwargs)


@pytest.fixture(scope="module")
def reference_and_params():
    """diffusers' WanTransformer3DModel in float64 throughout, but for its timestep sinusoid.

    Its `.float()` casts (meant to lift bf16 to float32: FP32LayerNorm, the block's residual, RoPE tables;
    diffusers 0.42 transformer_wan.py:469-499, normalization.py:84-93) would drop a float64 model to
    float32 there, a 2.8e-6 floor against our float64 (SPEC-models §5 measured it for Wan2.1); here they
    keep float64, from construction on (the RoPE tables are built in __init__). The sinusoid stays
    diffusers' float32 one (its frequencies are built in float32), which our
    `sinusoid_dtype=torch.float32` reproduces bit for bit.
    """
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    with float_is(float_keeping_float64):
        reference = diffusers.WanTransformer3DModel(**diffusers_kwargs(WAN22_TINY)).double().eval()
    perturb_(dict(reference.named_parameters()))
    sinusoid = reference.condition_embedder.timesteps_proj
    float64_forward = sinusoid.forward

    def float32_sinusoid(timestep):
        with float_is(ORIGINAL_FLOAT):
            return float64_forward(timestep)

    sinusoid.forward = float32_sinusoid
    return reference, {diffusers_to_ours(k): v.detach() for k, v in reference.state_dict().items()}


def diffusers_forward(reference, x, timestep, context):
    with torch.no_grad(), float_is(float_keeping_float64):
        return reference(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]


def meta_model(cfg=WAN22_TINY, **options) -> WanModel:
    with torch.device("meta"):
        return WanModel(cfg, **options)


def inputs(batch=2, frames=3, height=4, width=6, text_len=7, seed=1):
    """48-channel latents, timesteps 1000 U(0, 1), text with zero padding rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 48, frames, height, width, generator=g, dtype=torch.float64)
    context = torch.randn(batch, text_len, WAN22_TINY.text_dim, generator=g, dtype=torch.float64)
    context[:, -2:] = 0.0
    return x, 1000.0 * torch.rand(batch, generator=g, dtype=torch.float64), context


def grid_of(x) -> tuple[int, int, int]:
    return x.shape[2], x.shape[3] // 2, x.shape[4] // 2


def test_release_config_matches_the_hub_diffusers_model_at_real_size():
    """On the meta device: the hub's Wan2.2-TI2V-5B-Diffusers transformer config and ours have the same
    825 tensors, name for name through the key map and shape for shape; 5.00 B parameters."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        reference = diffusers.WanTransformer3DModel(**diffusers_kwargs(WAN22_TI2V_5B))
    ours = meta_model(WAN22_TI2V_5B)
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    assert {ours_to_diffusers(k): v.shape for k, v in ours.state_dict().items()} == theirs
    assert len(theirs) == 825
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(4.9998e9, rel=1e-4)
    spec = get_spec("wan2.2-ti2v-5b")
    assert spec.channels == 48 and spec.pixel_shape == (121, 704, 1280) and spec.tokens() == 31 * 22 * 40


@pytest.mark.parametrize("timestep_kind", ["per-sample", "per-token", "first-frame-clean"])
def test_matches_diffusers_in_float64(reference_and_params, timestep_kind):
    """max |d| / (1 + |ref|) against diffusers in float64 (`reference_and_params`), for a [B] timestep and
    a [B, L] one (random per token; and the image-to-video pattern, 0 on the first frame's tokens).

    The issue asks for <= 1e-6; measured 1.0e-14 per sample, 1.3e-14 per token, 2.0e-14 first frame
    clean, so the bound is 1e-12. With diffusers' float32 casts left in (RoPE tables, LayerNorms) the
    same comparison gives 2.8e-6, of which the RoPE tables alone leave 3.7e-7.
    """
    reference, params = reference_and_params
    x, timestep, context = inputs()
    tokens = x.shape[2] * x.shape[3] * x.shape[4] // 4
    if timestep_kind == "per-token":
        timestep = 1000.0 * torch.rand(x.shape[0], tokens, generator=torch.Generator().manual_seed(2)).double()
    elif timestep_kind == "first-frame-clean":
        timestep = first_frame_timesteps(timestep, grid_of(x))
    model = meta_model(sinusoid_dtype=torch.float32, attention_fn=attention_reference)
    out = torch.func.functional_call(model, params, (x, timestep, context))
    ref = diffusers_forward(reference, x, timestep, context)
    assert out.shape == ref.shape == x.shape
    assert ref.abs().mean() > 1.0
    assert max_relative_error(out, ref) <= 1e-12


def test_first_frame_timesteps_are_the_pipelines_mask_times_t():
    """The release's (and diffusers') construction: mask[0][0][:, ::2, ::2] * t, flattened."""
    t = torch.tensor([700.0, 30.5], dtype=torch.float64)
    latent_shape = (48, 3, 4, 6)
    mask = torch.ones(1, 1, *latent_shape[1:], dtype=torch.float64)
    mask[:, :, 0] = 0.0
    expected = torch.stack([(mask[0][0][:, ::2, ::2] * s).flatten() for s in t])
    got = first_frame_timesteps(t, (3, 2, 3))
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="timestep must be"):
        first_frame_timesteps(t[:, None], (3, 2, 3))


def test_keep_first_frame_replaces_only_the_first_frame():
    latent = torch.randn(2, 48, 3, 2, 3, dtype=torch.float64)
    image = torch.randn(2, 48, 1, 2, 3, dtype=torch.float64)
    mask = torch.ones_like(latent)
    mask[:, :, 0] = 0.0
    assert torch.equal(keep_first_frame(latent, image), (1 - mask) * image + mask * latent)
    with pytest.raises(ValueError, match="image latent must be"):
        keep_first_frame(latent, image[:, :, :, :1])


def test_a_shared_per_token_timestep_equals_the_per_sample_one(reference_and_params):
    _, params = reference_and_params
    x, timestep, context = inputs()
    tokens = x.shape[2] * x.shape[3] * x.shape[4] // 4
    net = velocity_net(meta_model())
    torch.testing.assert_close(
        net(params, x, timestep[:, None].expand(-1, tokens), context),
        net(params, x, timestep, context),
        rtol=1e-13,
        atol=1e-13,
    )


def test_a_timestep_of_the_wrong_token_count_raises(reference_and_params):
    _, params = reference_and_params
    x, timestep, context = inputs()
    with pytest.raises(ValueError, match=r"per token \[B, L\] = \[2, 18\]"):
        velocity_net(meta_model())(params, x, timestep[:, None].expand(-1, 17), context)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_export_then_load_round_trips_in_both_layouts(tmp_path, reference_and_params, layout):
    _, params = reference_and_params
    export_checkpoint(params, tmp_path / "model.safetensors", key_maps(WAN22_TINY)[layout])
    model, report = build_model(SPEC, tmp_path / "model.safetensors", layout)
    assert report.ok and len(report.loaded) == len(params)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, params[name]), name


def test_rcm_style_linear_patch_embedding_of_48_channels_loads(tmp_path, reference_and_params):
    """An rCM-layout file stores the patch embedding as Linear (D, 48 * 1 * 2 * 2)."""
    _, params = reference_and_params
    state = {f"net.{k}": v.clone() for k, v in params.items()}
    state["net.patch_embedding.weight"] = params["patch_embedding.weight"].reshape(WAN22_TINY.dim, 192).clone()
    torch.save({"model": state}, tmp_path / "rcm.pth")
    model = meta_model()
    report = load_into_meta_module(model, tmp_path / "rcm.pth", key_maps(WAN22_TINY)["official"])
    assert report.ok
    assert torch.equal(model.patch_embedding.weight, params["patch_embedding.weight"])


def test_per_token_jvp_matches_float64_central_difference(reference_and_params):
    """jvp in x and in a per-token timestep (first frame held at 0 with zero tangent, as the clean image)
    against a central difference with step 1e-6."""
    _, params = reference_and_params
    x, timestep, context = inputs()
    per_token = first_frame_timesteps(timestep, grid_of(x))
    g = torch.Generator().manual_seed(5)
    tangents = (
        torch.randn(x.shape, generator=g, dtype=x.dtype),
        first_frame_timesteps(10.0 * torch.randn(2, generator=g, dtype=x.dtype), grid_of(x)),
    )
    model = meta_model()

    def f(x, t):
        return torch.func.functional_call(model, params, (x, t, context))

    _, tangent = torch.func.jvp(f, (x, per_token), tangents)
    step = 1e-6
    central = (
        f(x + step * tangents[0], per_token + step * tangents[1])
        - f(x - step * tangents[0], per_token - step * tangents[1])
    ) / (2 * step)
    scale = tangent.abs().max().item()
    assert scale > 1.0
    torch.testing.assert_close(tangent, central, rtol=0.0, atol=1e-7 * scale)


@pytest.mark.slow  # inductor compiles C++ kernels on CPU
def test_compiled_per_token_forward_and_jvp_match_eager(reference_and_params):
    """fullgraph=True through the per-token time path: forward and tangent equal eager."""
    _, params = reference_and_params
    x, timestep, context = inputs(batch=1, frames=2, seed=3)
    per_token = first_frame_timesteps(timestep, grid_of(x))
    tangents = (torch.randn_like(x), first_frame_timesteps(torch.full_like(timestep, 7.0), grid_of(x)))
    model = meta_model()

    def jvp(x, t, tx, tt):
        return torch.func.jvp(lambda x, t: torch.func.functional_call(model, params, (x, t, context)), (x, t), (tx, tt))

    eager = jvp(x, per_token, *tangents)
    compiled = torch.compile(jvp, fullgraph=True)(x, per_token, *tangents)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_exported_diffusers_file_loads_into_diffusers_strictly(tmp_path, reference_and_params):
    """Our diffusers-layout export of the Wan2.2-shaped net is what diffusers itself loads (strict)."""
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    reference, params = reference_and_params
    export_checkpoint(params, tmp_path / "d.safetensors", key_maps(WAN22_TINY)["diffusers"])
    fresh = diffusers.WanTransformer3DModel(**diffusers_kwargs(WAN22_TINY)).double()
    fresh.load_state_dict(load_file(tmp_path / "d.safetensors"), strict=True)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
