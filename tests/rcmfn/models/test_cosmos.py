"""rcmfn.models.cosmos: equivalence with diffusers, key maps and checkpoint round trips, JVP, compile.

SPEC-models §2 (architecture, keys), §5 (equivalence recipe). diffusers is a test-only dependency;
its Cosmos transformer needs torchvision only to resize the padding mask, so a nearest-interpolation
stand-in replaces it (SPEC §5) instead of installing torchvision (which pulls another torch).
"""

import functools
import math
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch.func import jvp

from ops.attention.reference import attention_reference
from rcmfn.models.checkpoint import CheckpointMismatchError, export_checkpoint, load_into_meta_module
from rcmfn.models.cosmos import configs, keys
from rcmfn.models.cosmos import model as cosmos_model
from rcmfn.models.cosmos.configs import TINY_T2I, TINY_V2W
from rcmfn.models.cosmos.model import CosmosDiT, build_cosmos, random_cosmos, velocity_net
from rcmfn.models.registry import build_model, get_spec

F64 = torch.float64
VARIANTS = {"t2i": TINY_T2I, "v2w": TINY_V2W}
DIFFUSERS_ROPE_SCALE = {"t2i": (1.0, 4.0, 4.0), "v2w": (20 / 24, 2.0, 2.0)}  # (t, h, w) as TINY_*
COND_T = 1e-4 / 1.0001  # timestep of conditioning frames, SPEC §2.5


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomise_(module, generator):
    """SPEC §5 step 1: every parameter N(0, 0.3^2), plus 1 for 1-D (norm) weights; never zeros."""
    for param in module.parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=F64)
        param.copy_(0.3 * noise + (1.0 if param.dim() == 1 else 0.0))
    return module


def params_of(module):
    return {name: p.detach() for name, p in module.named_parameters()}


def make_inputs(variant, B=2, T=3, H=6, W=10, Lc=7, seed=0):
    """Random latents, timesteps and text (SPEC §5 step 3); V2W: frame 0 conditioned, per-frame t."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, T, H, W, generator=g, dtype=F64)
    context = torch.randn(B, Lc, 24, generator=g, dtype=F64)
    context[:, -2:] = 0  # padded text rows are zero and attended (SPEC §2.5)
    t = torch.rand(B, generator=g, dtype=F64)
    kwargs = {}
    if variant == "v2w":
        mask = torch.zeros(B, 1, T, H, W, dtype=F64)
        t = t[:, None].repeat(1, T)
        if T > 1:
            mask[:, :, 0] = 1
            t[:, 0] = COND_T
        kwargs["condition_mask"] = mask
    return x, t, context, kwargs


def tiny_model(variant, generator_seed=0, dtype=F64, **overrides):
    cfg = replace(VARIANTS[variant], **overrides)
    model = build_cosmos(cfg).to_empty(device="cpu").to(dtype)
    return randomise_(model, torch.Generator().manual_seed(generator_seed))


def max_rel_err(out, ref):
    """max |out - ref| / (1 + |ref|), the equivalence metric of SPEC §5."""
    return ((out.double() - ref.double()).abs() / (1 + ref.double().abs())).max().item()


# ------------------------------------------------------------------------------------------------
# Equivalence with diffusers' CosmosTransformer3DModel (float64)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_cosmos():
    """Tiny random diffusers Cosmos transformers (SPEC §5 kwargs), float64, keyed by variant."""
    import diffusers.models.transformers.transformer_cosmos as transformer_cosmos
    from diffusers import CosmosTransformer3DModel

    stand_in = types.SimpleNamespace(
        functional=types.SimpleNamespace(
            resize=lambda x, size, interpolation: F.interpolate(x, size=size, mode=interpolation)
        ),
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
    )
    saved = getattr(transformer_cosmos, "transforms", None)
    transformer_cosmos.transforms = stand_in
    torch.manual_seed(0)
    nets = {}
    for seed, variant in enumerate(VARIANTS):
        net = CosmosTransformer3DModel(
            in_channels=17 if variant == "v2w" else 16, out_channels=16, num_attention_heads=2,
            attention_head_dim=16, num_layers=2, mlp_ratio=4.0, text_embed_dim=24, adaln_lora_dim=8,
            max_size=(128, 240, 240), patch_size=(1, 2, 2), rope_scale=DIFFUSERS_ROPE_SCALE[variant],
            concat_padding_mask=True, extra_pos_embed_type=None,
        )  # fmt: skip
        nets[variant] = randomise_(net.to(F64).eval(), torch.Generator().manual_seed(100 + seed))
    yield nets
    transformer_cosmos.transforms = saved


@pytest.fixture(scope="module")
def diffusers_files(diffusers_cosmos, tmp_path_factory):
    """Each diffusers net's state dict written as a diffusers-layout .safetensors file."""
    folder = tmp_path_factory.mktemp("diffusers_cosmos")
    files = {}
    for variant, net in diffusers_cosmos.items():
        files[variant] = folder / f"{variant}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(files[variant]))
    return files


def run_diffusers(net, x, t, context, kwargs, padding_mask):
    """diffusers call convention: per-frame t as (B, 1, T, 1, 1), fps=None (SPEC §2.8 items 2, 4)."""
    timestep = t[:, None, :, None, None] if t.dim() == 2 else t
    with torch.no_grad():
        return net(x, timestep, context, fps=None, padding_mask=padding_mask, return_dict=False, **kwargs)[0]


@pytest.mark.parametrize("variant", ["t2i", "v2w"])
@pytest.mark.parametrize("shape", [(1, 6, 10), (3, 6, 10), (2, 4, 2)], ids=["image", "video", "tall"])
def test_matches_diffusers_in_float64(variant, shape, diffusers_cosmos, diffusers_files):
    """Ours loaded from the diffusers state dict equals diffusers: <= 1e-5 relative with diffusers'
    qk eps and float32 sinusoid, <= 1e-3 absolute with the official eps 1e-6 (SPEC §5)."""
    T, H, W = shape
    x, t, context, kwargs = make_inputs(variant, T=T, H=H, W=W)
    g = torch.Generator().manual_seed(1)
    padding_mask = (torch.rand(1, 1, 8 * H, 8 * W, generator=g) > 0.5).to(F64)  # non-zero channel
    ref = run_diffusers(diffusers_cosmos[variant], x, t, context, kwargs, padding_mask)
    assert ref.abs().mean() > 0.5  # a live network, not a near-zero output

    errors = {}
    for eps in (1e-5, 1e-6):
        ours = build_cosmos(replace(VARIANTS[variant], qk_norm_eps=eps))
        load_into_meta_module(ours, diffusers_files[variant], keys.diffusers_key_map(), dtype=F64)
        # diffusers builds the sinusoid from float32 time: passing float32 t selects the same.
        with torch.no_grad():
            out = ours(x, t.float(), context, padding_mask=padding_mask, **kwargs)
        errors[eps] = (max_rel_err(out, ref), (out - ref).abs().max().item())
    assert errors[1e-5][0] <= 1e-5, errors
    assert errors[1e-6][1] <= 1e-3, errors


def test_rotate_half_rope_is_what_diffusers_checks(diffusers_cosmos, diffusers_files):
    """Sensitivity: interleaved RoPE (Wan's layout) instead of rotate-half breaks the equivalence."""
    x, t, context, kwargs = make_inputs("t2i")
    ref = run_diffusers(diffusers_cosmos["t2i"], x, t, context, kwargs, torch.zeros(1, 1, 48, 80, dtype=F64))
    ours = build_cosmos(replace(TINY_T2I, qk_norm_eps=1e-5))
    load_into_meta_module(ours, diffusers_files["t2i"], keys.diffusers_key_map(), dtype=F64)

    def interleaved(x, cos, sin):
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return x * cos + rotated * sin

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(cosmos_model, "apply_rope", interleaved)
        wrong = ours(x, t.float(), context)
    assert (wrong - ref).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Key maps and checkpoint IO
# ------------------------------------------------------------------------------------------------

# SPEC §2.7 table, written out: official names of the globals and of one block.
OFFICIAL_GLOBALS = {
    "x_embedder.proj.1.weight", "t_embedder.1.linear_1.weight", "t_embedder.1.linear_2.weight",
    "t_embedding_norm.weight", "final_layer.adaln_modulation.1.weight",
    "final_layer.adaln_modulation.2.weight", "final_layer.linear.weight",
}  # fmt: skip
OFFICIAL_BLOCK = {
    *(f"{a}.{p}.weight" for a in ("self_attn", "cross_attn")
      for p in ("q_proj", "k_proj", "v_proj", "output_proj", "q_norm", "k_norm")),
    *(f"adaln_modulation_{m}.{i}.weight" for m in ("self_attn", "cross_attn", "mlp") for i in (1, 2)),
    "mlp.layer1.weight", "mlp.layer2.weight",
}  # fmt: skip


@pytest.mark.parametrize("variant", ["t2i", "v2w"])
def test_key_maps_are_bijections_onto_each_layout(variant, diffusers_cosmos):
    """ours -> diffusers hits exactly diffusers' state-dict keys; ours -> official exactly SPEC §2.7's
    table; every map inverts."""
    ours = set(build_cosmos(VARIANTS[variant]).state_dict())
    to_diffusers = keys.diffusers_key_map()
    assert {to_diffusers.from_ours(n) for n in ours} == set(diffusers_cosmos[variant].state_dict())
    official = keys.official_key_map()
    expected = {f"net.{k}" for k in OFFICIAL_GLOBALS} | {
        f"net.blocks.{i}.{k}" for i in range(2) for k in OFFICIAL_BLOCK
    }
    assert {official.from_ours(n) for n in ours} == expected
    for key_map in (official, to_diffusers, keys.official_key_map("net_ema.")):
        assert {key_map.to_ours(key_map.from_ours(n)) for n in ours} == ours
    assert len(ours) == 7 + 20 * 2


@pytest.mark.parametrize(
    "name, n_keys, n_params, patch_width",
    [("cosmos0.6b", 407, 597_536_000, 68), ("cosmos2b", 567, 1_956_405_248, 68),
     ("cosmos14b", 727, 14_265_265_152, 68), ("cosmos2b-video", 567, 1_956_413_440, 72),
     ("cosmos14b-video", 727, 14_265_285_632, 72)],
)  # fmt: skip
def test_released_configs_have_the_published_sizes(name, n_keys, n_params, patch_width):
    """Meta-built nets have SPEC §2.1/§2.7's tensor counts, parameter counts and patch widths."""
    net = build_cosmos(configs.CONFIGS[name])
    assert len(net.state_dict()) == n_keys
    assert sum(p.numel() for p in net.parameters()) == n_params
    assert net.x_embedder.weight.shape[1] == patch_width
    assert all(p.is_meta for p in net.parameters())


@pytest.mark.parametrize("name", ["cosmos2b", "cosmos14b", "cosmos2b-video", "cosmos14b-video"])
def test_registry_entries_build_the_cosmos_configs(name, tmp_path):
    """Each registry entry carries its config, T5 text width, timestep scale 1 and the key maps;
    build_model streams an official file into its (here: tiny) net."""
    spec = get_spec(name)
    assert spec.config is configs.CONFIGS[name] and spec.family.name == "cosmos"
    assert (spec.text_dim, spec.timestep_scale) == (1024, configs.TIMESTEP_SCALE)
    assert next(iter(spec.key_maps)) == "official"
    tiny = replace(spec.config, dim=32, num_blocks=1, num_heads=2, text_dim=24, adaln_lora_dim=8)
    source = build_cosmos(tiny).to_empty(device="cpu")
    randomise_(source, torch.Generator().manual_seed(8))
    path = tmp_path / "model.safetensors"
    export_checkpoint(params_of(source), path, spec.key_maps["official"])
    net, report = build_model(replace(spec, config=tiny), path, dtype=torch.bfloat16)
    assert report.ok and isinstance(net, CosmosDiT)
    assert torch.equal(net.x_embedder.weight, source.x_embedder.weight.to(torch.bfloat16))


def write_official(path, params, ema_params):
    """An official-style file: `net.` and `net_ema.` copies plus every kind of junk key (SPEC §2.7)."""
    official, ema = keys.official_key_map(), keys.official_key_map("net_ema.")
    state = {official.from_ours(n): t for n, t in params.items()}
    state |= {ema.from_ours(n): t for n, t in ema_params.items()}
    state |= {
        "net.pos_embedder.seq": torch.arange(128.0),
        "net.pos_embedder.dim_spatial_range": torch.arange(0, 4, 2.0) / 4,
        "net.pos_embedder.dim_temporal_range": torch.arange(0, 8, 2.0) / 8,
        "net.accum_video_sample_counter": torch.tensor(7),
        "net.accum_image_sample_counter": torch.tensor(3),
        "net.accum_iteration": torch.tensor(11),
        "net.accum_train_in_hours": torch.tensor(1.5),
        "net.blocks.0.self_attn.q_norm._extra_state": torch.zeros(0, dtype=torch.uint8),
        "net.final_layer.linear._extra_state": torch.zeros(3, dtype=torch.uint8),
    }
    if path.suffix == ".pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_official_checkpoint_loads_with_junk_dropped(suffix, tmp_path):
    """`net.` tensors load bit-exactly; junk and the other EMA copy are dropped; `net_ema.` selects it."""
    source = tiny_model("v2w", 1, torch.float32)
    ema = tiny_model("v2w", 2, torch.float32)
    path = tmp_path / f"model{suffix}"
    write_official(path, params_of(source), params_of(ema))
    for prefix, want in (("net.", source), ("net_ema.", ema)):
        net = build_cosmos(TINY_V2W)
        report = load_into_meta_module(net, path, keys.official_key_map(prefix))
        assert report.ok and not report.not_materialised
        for name, tensor in params_of(want).items():
            assert torch.equal(net.get_parameter(name), tensor), name
        assert "net.pos_embedder.seq" in report.dropped and "net.accum_iteration" in report.dropped
        assert "net.final_layer.linear._extra_state" in report.dropped


@pytest.mark.parametrize("layout", ["official", "diffusers", "ours"])
def test_export_then_load_round_trips(layout, tmp_path):
    """export_checkpoint in each layout writes that layout's names; loading it back is bit-exact."""
    source = tiny_model("t2i", 3, torch.bfloat16)
    key_map = keys.KEY_MAPS[layout]
    path = tmp_path / f"{layout}.safetensors"
    export_checkpoint(params_of(source), path, key_map)
    with safe_open(str(path), framework="pt") as f:
        written = set(f.keys())
    assert written == {key_map.from_ours(n) for n in params_of(source)}
    if layout == "official":
        assert all(k.startswith("net.") for k in written) and "net.x_embedder.proj.1.weight" in written
    if layout == "diffusers":
        assert "transformer_blocks.1.ff.net.2.weight" in written
    net = build_cosmos(TINY_T2I)
    load_into_meta_module(net, path, key_map)
    for name, tensor in params_of(source).items():
        assert torch.equal(net.get_parameter(name), tensor), name


def test_mismatched_checkpoints_raise_naming_the_keys(tmp_path):
    """Wrong variant, wrong depth, a foreign key and the wrong layout each raise, naming the keys."""
    path = tmp_path / "t2i.safetensors"
    export_checkpoint(params_of(tiny_model("t2i")), path, keys.official_key_map())
    with pytest.raises(CheckpointMismatchError, match=r"x_embedder\.weight: \(32, 68\) vs \(32, 72\)"):
        load_into_meta_module(build_cosmos(TINY_V2W), path, keys.official_key_map())
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.2\.mlp\.layer1\.weight"):
        load_into_meta_module(build_cosmos(replace(TINY_T2I, num_blocks=3)), path, keys.official_key_map())
    with pytest.raises(CheckpointMismatchError, match=r"net\.blocks\.1\.mlp\.layer2\.weight"):
        load_into_meta_module(build_cosmos(replace(TINY_T2I, num_blocks=1)), path, keys.official_key_map())
    with pytest.raises(CheckpointMismatchError, match=r"47 unexpected .*net\.blocks\.0\.mlp\.layer1\.weight"):
        load_into_meta_module(build_cosmos(TINY_T2I), path, keys.diffusers_key_map())
    foreign = tmp_path / "foreign.safetensors"
    tensors = {keys.official_key_map().from_ours(n): t for n, t in params_of(tiny_model("t2i")).items()}
    save_file(tensors | {"net.logvar.0.weight": torch.ones(2)}, str(foreign))
    with pytest.raises(CheckpointMismatchError, match=r"net\.logvar\.0\.weight"):
        load_into_meta_module(build_cosmos(TINY_T2I), foreign, keys.official_key_map())


# ------------------------------------------------------------------------------------------------
# Forward-mode derivatives and compile
# ------------------------------------------------------------------------------------------------


def velocity_fn(net, context, kwargs):
    """(params, x, t) -> v through `velocity_net`, rcmfn's functional_call adapter."""
    net_fn = velocity_net(net)
    return lambda params, x, t: net_fn(params, x, t, context, kwargs.get("condition_mask"))


def test_jvp_matches_central_difference_in_float64():
    """torch.func.jvp in (x, per-frame t) equals a float64 central difference (rel. <= 1e-7)."""
    net = tiny_model("v2w")
    params = params_of(net)
    x, t, context, kwargs = make_inputs("v2w")
    f = velocity_fn(net, context, kwargs)
    g = torch.Generator().manual_seed(5)
    dx, dt = torch.randn(x.shape, generator=g, dtype=F64), torch.rand(t.shape, generator=g, dtype=F64)
    with torch.no_grad():
        out, tangent = jvp(lambda x, t: f(params, x, t), (x, t), (dx, dt))
        h = 1e-5
        central = (f(params, x + h * dx, t + h * dt) - f(params, x - h * dx, t - h * dt)) / (2 * h)
    assert tangent.abs().mean() > 1e-2
    assert max_rel_err(tangent, central) <= 1e-7
    assert torch.equal(out, f(params, x, t))


def test_jvp_through_ops_attention_matches_reference_attention(monkeypatch):
    """The model's jvp through `ops.attention` (its forward-AD rule) equals the jvp through the plain
    reference attention, in float64 (parameter tangents included)."""
    net = tiny_model("t2i")
    params = params_of(net)
    x, t, context, kwargs = make_inputs("t2i", T=2, H=4, W=6)
    f = velocity_fn(net, context, kwargs)
    g = torch.Generator().manual_seed(6)
    tangents = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}
    dx = torch.randn(x.shape, generator=g, dtype=F64)
    args, tans = (params, x, t), (tangents, dx, torch.ones_like(t))
    with torch.no_grad():
        out, tangent = jvp(f, args, tans)
        monkeypatch.setattr(cosmos_model, "attention", attention_reference)
        ref_out, ref_tangent = jvp(f, args, tans)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-10, atol=1e-10)


def test_time_embedding_silu_is_computed_once_whatever_the_depth():
    """The traced forward has as many SiLUs with 1 block as with 3: the modulations share SiLU(e).

    One per modulation (85 in the 2B net) made inductor fuse the copies into a single 63-output
    kernel that ptxas did not finish compiling (H200, torch 2.11; docs/benchmarks.md)."""

    def silu_count(num_blocks):
        net = tiny_model("t2i", num_blocks=num_blocks)
        x, t, context, kwargs = make_inputs("t2i")
        f = velocity_fn(net, context, kwargs)
        graph = torch.fx.experimental.proxy_tensor.make_fx(f)(params_of(net), x, t).graph
        return sum(node.target is torch.ops.aten.silu.default for node in graph.nodes)

    assert silu_count(1) == silu_count(3) <= 2  # the time MLP's and the modulations' shared one


@pytest.mark.slow
def test_compiled_forward_and_jvp_match_eager_without_graph_breaks():
    """torch.compile(fullgraph=True) of the forward and of the jvp (float64, one block) == eager."""
    net = tiny_model("v2w", num_blocks=1)
    params = params_of(net)
    x, t, context, kwargs = make_inputs("v2w")
    f = velocity_fn(net, context, kwargs)
    dx, dt = torch.randn_like(x), torch.rand_like(t)

    def tangent_fn(params, x, t, dx, dt):
        return jvp(lambda x, t: f(params, x, t), (x, t), (dx, dt))

    with torch.no_grad():
        eager, eager_jvp = f(params, x, t), tangent_fn(params, x, t, dx, dt)
        compiled = torch.compile(f, fullgraph=True)(params, x, t)
        compiled_jvp = torch.compile(tangent_fn, fullgraph=True)(params, x, t, dx, dt)
    # The RoPE table is float32 by design (SPEC §2.3) and inductor's float32 cos/sin differ from
    # eager's by an ulp, so compiled and eager agree to float32 precision, not float64: measured max
    # relative error 1.1e-7 (8.9e-15 with a float64 table). 1e-5 is 100 float32 epsilons.
    assert max_rel_err(compiled, eager) <= 1e-5
    assert max_rel_err(compiled_jvp[0], eager) <= 1e-5
    assert max_rel_err(compiled_jvp[1], eager_jvp[1]) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Properties on hostile shapes, layout pieces, options
# ------------------------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(
    variant=st.sampled_from(["t2i", "v2w"]),
    B=st.integers(1, 3), T=st.integers(1, 3), Hp=st.integers(1, 4), Wp=st.integers(1, 5),
    Lc=st.integers(1, 5), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_each_sample_is_computed_independently_of_the_batch(variant, B, T, Hp, Wp, Lc, seed):
    """Hostile shapes (B, T, H', W', Lc down to 1, H' != W'): the batch output equals each sample run
    alone; the output is finite and shaped like x."""
    net = shared_net(variant)
    x, t, context, kwargs = make_inputs(variant, B=B, T=T, H=2 * Hp, W=2 * Wp, Lc=Lc, seed=seed)
    with torch.no_grad():
        out = net(x, t, context, **kwargs)
        for i in range(B):
            one = net(x[i : i + 1], t[i : i + 1], context[i : i + 1], **{k: v[i : i + 1] for k, v in kwargs.items()})
            torch.testing.assert_close(out[i : i + 1], one, rtol=1e-12, atol=1e-12)
    assert out.shape == x.shape and torch.isfinite(out).all()


@functools.cache
def shared_net(variant):
    """One random float64 tiny net per variant, shared by the read-only tests below."""
    return tiny_model(variant, 7)


def test_per_frame_timesteps_equal_to_one_shared_timestep():
    """t of shape [B, T'] with equal entries gives the same output as t of shape [B] (SPEC §2.2-4)."""
    net = shared_net("t2i")
    x, t, context, _ = make_inputs("t2i", T=3)
    with torch.no_grad():
        per_frame, shared = net(x, t[:, None].expand(-1, 3), context), net(x, t, context)
    torch.testing.assert_close(per_frame, shared, rtol=1e-12, atol=1e-12)


def test_rope_bases_and_angles_match_spec_formula():
    """RoPE angles equal SPEC §2.3's formula evaluated in float64 (d = 128: split 44/42/42, NTK bases
    42870.94 for r = 4 and 8261.30 for r_t = 20/24)."""
    assert cosmos_model.rope_axis_dims(128) == (44, 42, 42) and cosmos_model.rope_axis_dims(64) == (
        24,
        20,
        20,
    )
    assert 10000 * 4 ** (42 / 40) == pytest.approx(42870.94, abs=0.01)
    assert 10000 * (20 / 24) ** (44 / 42) == pytest.approx(8261.30, abs=0.01)
    grid, ratios = (5, 3, 7), (20 / 24, 2.0, 3.0)
    angles = cosmos_model.rope_angles(grid, 128, ratios, "cpu")
    assert angles.dtype == torch.float32 and angles.shape == (5 * 3 * 7, 128)
    want = []
    for t, h, w in ((t, h, w) for t in range(5) for h in range(3) for w in range(7)):
        phi = []
        for pos, d, r in zip((t, h, w), (44, 42, 42), ratios, strict=True):
            theta = 10000 * r ** (d / (d - 2))
            phi += [pos * theta ** (-2 * j / d) for j in range(d // 2)]
        want.append(phi + phi)
    torch.testing.assert_close(angles.double(), torch.tensor(want, dtype=F64), rtol=1e-6, atol=1e-6)


def test_patchify_and_unpatchify_use_the_spec_feature_orders():
    """patchify's feature index is ((c p_t + i_t) p + i_h) p + i_w; unpatchify reads
    ((i_h p + i_w) p_t + i_t) C + c (SPEC §2.2 steps 2 and 8), on hostile sizes with p_t = 2."""
    B, C, p_t, p, grid = 2, 3, 2, 2, (2, 3, 5)
    T, H, W = grid[0] * p_t, grid[1] * p, grid[2] * p
    x = torch.randn(B, C, T, H, W, dtype=F64)
    tokens = cosmos_model.patchify(x, p_t, p)
    y = torch.randn(B, grid[0], grid[1] * grid[2], p * p * p_t * C, dtype=F64)
    out = cosmos_model.unpatchify(y, grid, p_t, p)
    for (b, c, it, ih, iw), (tp, hp, wp) in [((1, 2, 1, 0, 1), (1, 2, 4)), ((0, 1, 0, 1, 0), (0, 1, 3))]:
        token = hp * grid[2] + wp
        position = (b, c, tp * p_t + it, hp * p + ih, wp * p + iw)
        assert tokens[b, tp, token, ((c * p_t + it) * p + ih) * p + iw] == x[position]
        assert out[position] == y[b, tp, token, ((ih * p + iw) * p_t + it) * C + c]


def test_high_precision_time_keeps_the_time_path_in_float32(tmp_path):
    """With high_precision_time, a bf16 load keeps the time-path weights float32 and the bf16 output
    stays close to the float64 net; without it every weight is bf16. In float64 the flag is a no-op."""
    x, t, context, kwargs = make_inputs("v2w")
    source = tiny_model("v2w", 9)
    with torch.no_grad():
        ref = source(x, t, context, **kwargs)
        hp64 = tiny_model("v2w", 9, high_precision_time=True)(x, t, context, **kwargs)
    assert torch.equal(hp64, ref)
    path = tmp_path / "official.safetensors"
    export_checkpoint(params_of(source), path, keys.official_key_map())
    for high_precision in (False, True):
        net = build_cosmos(replace(TINY_V2W, high_precision_time=high_precision))
        load_into_meta_module(net, path, keys.official_key_map(), dtype=torch.bfloat16)
        dtypes = {n: p.dtype for n, p in net.named_parameters()}
        assert (dtypes["t_embedder.linear_1.weight"] == torch.float32) == high_precision
        assert (dtypes["blocks.1.adaln_modulation_mlp.up.weight"] == torch.float32) == high_precision
        assert dtypes["blocks.1.mlp.layer1.weight"] == torch.bfloat16
        with torch.no_grad():
            out = net(x, t.float(), context, **kwargs)
        assert out.dtype == torch.bfloat16
        assert max_rel_err(out, ref) < 0.1


def test_blocks_can_be_wrapped_in_place_for_activation_checkpointing():
    """Replacing each `model.blocks[i]` by a checkpointing wrapper (what parallel/ does) changes
    neither the output nor the gradients."""

    class Checkpointed(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args):
            return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)

    net = tiny_model("t2i", 4)
    x, t, context, _ = make_inputs("t2i", T=2, H=4, W=4)
    out = net(x, t, context)
    grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    for i, block in enumerate(list(net.blocks)):
        net.blocks.register_module(str(i), Checkpointed(block))
    wrapped_out = net(x, t, context)
    wrapped_grads = torch.autograd.grad(wrapped_out.square().sum(), list(net.parameters()))
    torch.testing.assert_close(wrapped_out, out, rtol=0, atol=0)
    for g_wrapped, g in zip(wrapped_grads, grads, strict=True):
        torch.testing.assert_close(g_wrapped, g, rtol=1e-12, atol=1e-12)


def test_random_build_is_seeded_and_materialised_in_the_requested_dtype():
    """random_cosmos allocates on the device in the dtype, draws from the seed, never zeros."""
    a = random_cosmos(TINY_V2W, "cpu", torch.bfloat16, seed=3)
    b = random_cosmos(TINY_V2W, "cpu", torch.bfloat16, seed=3)
    c = random_cosmos(TINY_V2W, "cpu", torch.bfloat16, seed=4)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.x_embedder.weight, c.x_embedder.weight)
    assert all(p.float().abs().mean() > 0.01 for p in a.parameters())


@pytest.mark.parametrize(
    "case, match",
    [
        ("channels", r"x must be \[B, 16, T, H, W\]"),
        ("odd_width", r"divisible by the patch"),
        ("too_wide", r"exceeds the RoPE table"),
        ("timestep", r"timestep must be \[B\] or \[B, T'\]"),
        ("context", r"context must be \[2, Lc, 24\]"),
        ("no_mask", r"needs condition_mask"),
        ("mask_on_t2i", r"condition_mask given to a text-to-image net"),
        ("padding_mask", r"padding_mask must be \[2 or 1, 1, H_px, W_px\]"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(case, match):
    variant = "t2i" if case == "mask_on_t2i" else "v2w"
    x, t, context, kwargs = make_inputs("v2w", T=2, H=4, W=4)
    if case == "channels":
        x = x[:, :15]
    elif case == "odd_width":
        x = x[..., :3]
    elif case == "too_wide":
        x = torch.randn(2, 16, 1, 2, 242, dtype=F64)
        kwargs["condition_mask"] = torch.zeros(2, 1, 1, 2, 242, dtype=F64)
        t = t[:, :1]
    elif case == "timestep":
        t = torch.rand(2, 5, dtype=F64)
    elif case == "context":
        context = context[..., :20]
    elif case == "no_mask":
        kwargs = {}
    elif case == "padding_mask":
        kwargs["padding_mask"] = torch.zeros(2, 32, 32, dtype=F64)
    with pytest.raises(ValueError, match=match):
        shared_net(variant)(x, t, context, **kwargs)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        replace(TINY_T2I, num_heads=3)
    with pytest.raises(ValueError, match="head dim"):
        replace(TINY_T2I, dim=16, num_heads=2)
    with pytest.raises(ValueError, match="rope_extrapolation"):
        replace(TINY_T2I, rope_extrapolation=(1.0, 0.0, 4.0))
    assert configs.TIMESTEP_SCALE == 1.0 and math.isclose(configs.COSMOS_14B_V2W.rope_extrapolation[0], 20 / 24)
