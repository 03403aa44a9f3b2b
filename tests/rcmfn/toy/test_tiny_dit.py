"""Tests for rcmfn/toy/tiny_dit.py: shapes, jvp exactness, compile parity, input checks."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.toy import tiny_dit

SMALL = tiny_dit.TinyDiTConfig(width=16, depth=2, heads=2, mlp_ratio=2, text_dim=6, freq_dim=8)


def random_params(module, seed: int, dtype=torch.float32):
    """init_params plus noise on every entry, so no gate, head or bias is zero."""
    g = torch.Generator().manual_seed(seed)
    params = tiny_dit.init_params(module, g, dtype=torch.float64)
    noisy = params.apply(lambda p: p + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return noisy.apply(lambda p: p.to(dtype))


def inputs(shape, text_tokens: int, text_dim: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    c_noise = 1000.0 * torch.rand(shape[0], generator=g, dtype=dtype)
    cond = torch.randn(shape[0], text_tokens, text_dim, generator=g, dtype=dtype)
    return x, c_noise, cond


def test_fresh_net_is_deterministic_and_outputs_zero_velocity():
    module = tiny_dit.TinyDiT()
    a = tiny_dit.init_params(module, torch.Generator().manual_seed(0))
    b = tiny_dit.init_params(module, torch.Generator().manual_seed(0))
    assert all(torch.equal(a[k], b[k]) for k in a.keys())
    x, c_noise, cond = inputs((3, 4, 1, 8, 8), 8, 32, seed=1)
    v = tiny_dit.velocity_net(module)(a, x, c_noise, cond)
    assert v.shape == x.shape and torch.equal(v, torch.zeros_like(v))  # zero-initialised head (DiT)


@settings(deadline=None, max_examples=15)
@given(
    batch=st.integers(1, 3),
    frames=st.integers(1, 3),
    height=st.sampled_from([2, 4, 6, 10]),
    width=st.sampled_from([2, 6, 8]),
    text_tokens=st.integers(1, 5),
)
def test_output_has_input_shape_and_is_finite_for_odd_sizes(batch, frames, height, width, text_tokens):
    module = tiny_dit.TinyDiT(SMALL)
    params = random_params(module, seed=0)
    x, c_noise, cond = inputs((batch, 4, frames, height, width), text_tokens, 6, seed=batch)
    v = tiny_dit.velocity_net(module)(params, x, c_noise, cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


@settings(deadline=None, max_examples=10)
@given(patch=st.sampled_from([1, 2, 4]), frames=st.integers(1, 2), height=st.sampled_from([1, 2, 3]))
def test_patch_sizes_tokenise_whole_patches(patch, frames, height):
    """Each token is one patch x patch square: a change inside one square reaches the other squares only
    through attention, so with every attention output zeroed the other squares' outputs stay put."""
    module = tiny_dit.TinyDiT(replace(SMALL, patch=patch))
    net = tiny_dit.velocity_net(module)
    params = random_params(module, seed=patch)
    x, c_noise, cond = inputs((2, 4, frames, height * patch, 2 * patch), 3, 6, seed=height)
    v = net(params, x, c_noise, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    local = params.clone()
    for key in [k for k in local.keys() if "_attn.out." in k]:
        local[key] = torch.zeros_like(local[key])
    moved = x.clone()
    moved[:, :, 0, :patch, :patch] += 1.0  # the first token's square only
    delta = (net(local, moved, c_noise, cond) - net(local, x, c_noise, cond)).abs()
    assert delta[:, :, 0, :patch, :patch].max() > 1e-3
    delta[:, :, 0, :patch, :patch] = 0.0
    assert delta.max() == 0.0


def test_batch_rows_are_independent_and_order_free():
    module = tiny_dit.TinyDiT(SMALL)
    net, params = tiny_dit.velocity_net(module), random_params(module, seed=1)
    x, c_noise, cond = inputs((5, 4, 2, 4, 6), 3, 6, seed=2)
    perm = torch.tensor([3, 0, 4, 1, 2])
    full = net(params, x, c_noise, cond)
    torch.testing.assert_close(net(params, x[perm], c_noise[perm], cond[perm]), full[perm])
    torch.testing.assert_close(net(params, x[2:3], c_noise[2:3], cond[2:3]), full[2:3])


def test_output_depends_on_time_and_condition():
    module = tiny_dit.TinyDiT(SMALL)
    net, params = tiny_dit.velocity_net(module), random_params(module, seed=3)
    x, c_noise, cond = inputs((2, 4, 1, 4, 4), 4, 6, seed=4)
    base = net(params, x, c_noise, cond)
    assert (net(params, x, c_noise + 10.0, cond) - base).abs().max() > 1e-3
    assert (net(params, x, c_noise, cond.roll(1, dims=0)) - base).abs().max() > 1e-3


@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 2**16), frames=st.integers(1, 2), height=st.sampled_from([2, 6]))
def test_jvp_matches_float64_central_difference(seed, frames, height):
    module = tiny_dit.TinyDiT(SMALL)
    net, params = tiny_dit.velocity_net(module), random_params(module, seed, dtype=torch.float64)
    x, c_noise, cond = inputs((2, 4, frames, height, 4), 3, 6, seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    tc = 50.0 * torch.randn(2, generator=g, dtype=torch.float64)  # c_noise = 1000 r moves fast

    def f(x_in, c):
        return net(params, x_in, c, cond)

    out, tangent = torch.func.jvp(f, (x, c_noise), (tx, tc))
    h = 1e-6
    fd = (f(x + h * tx, c_noise + h * tc) - f(x - h * tx, c_noise - h * tc)) / (2 * h)
    torch.testing.assert_close(out, f(x, c_noise))
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())


def test_compiled_forward_and_jvp_match_eager():
    """fullgraph capture of forward and jvp; aot_eager backend so CPU CI does not pay inductor codegen."""
    module = tiny_dit.TinyDiT(SMALL)
    net, params = tiny_dit.velocity_net(module), random_params(module, seed=5)
    x, c_noise, cond = inputs((3, 4, 1, 6, 4), 5, 6, seed=6)
    tx, tc = torch.randn_like(x), torch.randn_like(c_noise)

    def forward_and_jvp(p, x_in, c, text, tx_in, tc_in):
        return torch.func.jvp(lambda a, b: net(p, a, b, text), (x_in, c), (tx_in, tc_in))

    eager = forward_and_jvp(params, x, c_noise, cond, tx, tc)
    compiled = torch.compile(forward_and_jvp, fullgraph=True, backend="aot_eager")(params, x, c_noise, cond, tx, tc)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4 * eager[1].abs().max().item())
    compiled_net = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled_net(params, x, c_noise, cond), eager[0], rtol=1e-4, atol=1e-5)


def test_bfloat16_params_give_bfloat16_velocity():
    module = tiny_dit.TinyDiT(SMALL)
    params = random_params(module, seed=7, dtype=torch.bfloat16)
    x, c_noise, cond = inputs((2, 4, 1, 4, 4), 2, 6, seed=8)
    v = tiny_dit.velocity_net(module)(params, x, c_noise, cond)
    reference = tiny_dit.velocity_net(module)(params.apply(lambda p: p.float()), x, c_noise, cond)
    assert v.dtype == torch.bfloat16
    torch.testing.assert_close(v.float(), reference, rtol=0.1, atol=0.1 * reference.abs().max().item())


def test_bad_inputs_raise():
    module = tiny_dit.TinyDiT(SMALL)
    net, params = tiny_dit.velocity_net(module), random_params(module, seed=9)
    x, c_noise, cond = inputs((2, 4, 1, 4, 4), 2, 6, seed=10)
    with pytest.raises(ValueError, match="H, W divisible by 2"):
        net(params, x[..., :3], c_noise, cond)
    with pytest.raises(ValueError, match="H, W divisible by 2"):
        net(params, x[:, :3], c_noise, cond)
    coarse = tiny_dit.TinyDiT(replace(SMALL, patch=4))
    with pytest.raises(ValueError, match="H, W divisible by 4"):
        tiny_dit.velocity_net(coarse)(random_params(coarse, seed=9), x[..., :2], c_noise, cond)
    with pytest.raises(ValueError, match="patch must be >= 1"):
        tiny_dit.TinyDiTConfig(patch=0)
    with pytest.raises(ValueError, match="c_noise must have shape"):
        net(params, x, c_noise[:1], cond)
    with pytest.raises(ValueError, match="cond must be"):
        net(params, x, c_noise, cond[..., :5])
    with pytest.raises(ValueError, match="exceeds max_frames"):
        net(params, torch.randn(1, 4, 17, 2, 2), c_noise[:1], cond[:1])
    with pytest.raises(ValueError, match="divisible by heads"):
        tiny_dit.TinyDiTConfig(width=10, heads=4)
