"""ops.attention: values and derivatives in every AD mode, eager and compiled, against float64.

Mirrors ops/attention/{op,kernel,reference}.py. The `impl` fixture (conftest.py) runs each test on
the reference path and on the Triton kernel (under the interpreter on CPU, at tiny sizes; for real on
CUDA, at full sizes). Tolerances (STYLE §9): the kernel's relative error against a float64 reference
is at most twice that of PyTorch math attention in the same dtype plus a few units of roundoff, and
under the issue's bounds (1e-3 for float32, 5e-3 for bfloat16/float16).
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import forward_ad

from ops import attention
from ops.attention import reference
from ops.attention.op import attention_bwd, attention_fwd, attention_fwd_jvp
from tests.ops.conftest import ON_GPU, TRITON, TRITON_RUNS_HERE, interpreter_defect

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")

# Sizes: the interpreter is slow, so CPU runs stay tiny; the GPU runs the same tests at full size.
LENGTHS = [1, 2, 7, 16, 17, 33, 40] if not ON_GPU else [1, 7, 64, 127, 333, 777, 1025]
HEAD_DIMS = [16, 32] if not ON_GPU else [64, 128]
HALF = torch.float16 if not ON_GPU else torch.bfloat16  # triton's interpreter has no bf16 dot
BOUND = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 5e-3, torch.float64: 1e-10}
EXAMPLES = 10 if not ON_GPU else 8


def rel_err(a, b):
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def online_softmax_rounding(seq_kv):
    """Relative rounding a flash kernel adds over math attention: its float32 accumulators are rescaled
    once per key block, each rescale one float32 rounding (blocks of 16 keys, the smallest config)."""
    return -(-seq_kv // 16) * unit_roundoff(torch.float32)


def math_attention(q, k, v, scale=None):
    """Plain math attention computed entirely in the inputs' dtype: PyTorch's own error baseline."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def make_inputs(shape_q, seq_kv, dtype, layout, seed):
    """Random q, k, v and tangents tq, tk, tv in the (B, S, H, D) layout, possibly strided views.

    layout: "contiguous"; "bhsd" (transposed views of (B, H, S, D) storage); "sliced" (a slice of a
    wider head dim, so rows are not dense).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch, seq_q, heads, head_dim = shape_q

    def one(seq):
        if layout == "bhsd":
            base, view = torch.randn(batch, heads, seq, head_dim, generator=gen), lambda t: t.transpose(1, 2)
        elif layout == "sliced":
            base = torch.randn(batch, seq, heads, head_dim + 16, generator=gen)
            view = lambda t: t[..., 3 : 3 + head_dim]
        else:
            base, view = torch.randn(batch, seq, heads, head_dim, generator=gen), lambda t: t
        return view(base.to(device=DEVICE, dtype=dtype))

    return [one(seq_q), one(seq_kv), one(seq_kv), one(seq_q), one(seq_kv), one(seq_kv)]


def float64_jvp(q, k, v, tq, tk, tv):
    """The issue's reference: torch.func.jvp of math attention, everything in float64."""
    args = [x.detach().double() for x in (q, k, v, tq, tk, tv)]
    return torch.func.jvp(reference.attention_reference, tuple(args[:3]), tuple(args[3:]))


def poison_allocator():
    """Fill and free a large block so that the next CUDA allocations start out as NaN."""
    if ON_GPU:
        torch.full((64 << 20,), float("nan"), device=DEVICE).sum()
        torch.cuda.synchronize()


def jvp_of(impl, q, k, v, tq, tk, tv, scale=None):
    poison_allocator()
    fn = functools.partial(attention, scale=scale, impl=impl)
    return torch.func.jvp(fn, (q, k, v), (tq, tk, tv))


def dtypes_for(impl):
    if impl == "triton":
        return [torch.float32, HALF]
    return [torch.float32, HALF, torch.float64]


shapes = st.tuples(
    st.integers(1, 2),  # batch
    st.sampled_from(LENGTHS),  # Sq
    st.sampled_from(LENGTHS),  # Skv
    st.integers(1, 3),  # heads
    st.sampled_from(HEAD_DIMS),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    shape=shapes,
    layout=st.sampled_from(["contiguous", "bhsd", "sliced"]),
    dtype_index=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_jvp_matches_float64_reference(impl, shape, layout, dtype_index, seed):
    """o and t_o from torch.func.jvp agree with float64 math attention (hostile shapes, views)."""
    dtypes = dtypes_for(impl)
    dtype = dtypes[dtype_index % len(dtypes)]
    batch, seq_q, seq_kv, heads, head_dim = shape
    inputs = make_inputs((batch, seq_q, heads, head_dim), seq_kv, dtype, layout, seed)
    out, tout = jvp_of(impl, *inputs)
    ref_out, ref_tout = float64_jvp(*inputs)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert torch.isfinite(out).all() and torch.isfinite(tout).all()
    if dtype == torch.float64:
        assert rel_err(out, ref_out) < BOUND[dtype] and rel_err(tout, ref_tout) < BOUND[dtype]
        return
    base_out, base_tout = torch.func.jvp(math_attention, tuple(inputs[:3]), tuple(inputs[3:]))
    slack = 4 * unit_roundoff(dtype) + online_softmax_rounding(seq_kv)
    for ours, base, ref in ((out, base_out, ref_out), (tout, base_tout, ref_tout)):
        err = rel_err(ours, ref)
        assert err < BOUND[dtype], (err, dtype)
        assert err <= 2 * rel_err(base, ref) + slack, (err, rel_err(base, ref), dtype)


@pytest.mark.skipif(not TRITON_RUNS_HERE, reason="runs under test_triton_kernel_under_interpreter")
@pytest.mark.parametrize("layout", ["contiguous", "bhsd", "sliced"])
def test_triton_kernel_writes_every_output(layout):
    """The Triton launcher fills every element of NaN-poisoned O, t_O and LSE (ragged tails)."""
    from ops.attention import kernel

    seq_q, seq_kv = (LENGTHS[-2], LENGTHS[-1])
    batch, heads, head_dim = 2, 3, HEAD_DIMS[-1]
    inputs = make_inputs((batch, seq_q, heads, head_dim), seq_kv, torch.float32, layout, seed=3)
    out = torch.full((batch, seq_q, heads, head_dim), float("nan"), device=DEVICE)
    tout = torch.full_like(out, float("nan"))
    lse = torch.full((batch, heads, seq_q), float("nan"), device=DEVICE)
    kernel.attention_fwd_jvp(*inputs, head_dim**-0.5, outputs=(out, tout, lse))
    ref_out, ref_tout, ref_lse = reference.attention_jvp_reference(*(x.double() for x in inputs), head_dim**-0.5)
    assert torch.isfinite(out).all() and torch.isfinite(tout).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref_out) < 1e-5 and rel_err(tout, ref_tout) < 1e-5 and rel_err(lse, ref_lse) < 1e-6


@settings(max_examples=max(EXAMPLES // 2, 4), deadline=None)
@given(shape=shapes, coeffs=st.tuples(st.floats(-2, 2), st.floats(-2, 2)), seed=st.integers(0, 2**31 - 1))
def test_tangent_is_linear_in_tangents(impl, shape, coeffs, seed):
    """t_o(a u + b w) = a t_o(u) + b t_o(w) for tangent triples u, w (the JVP is linear)."""
    batch, seq_q, seq_kv, heads, head_dim = shape
    dtype = torch.float32
    q, k, v, *u = make_inputs((batch, seq_q, heads, head_dim), seq_kv, dtype, "contiguous", seed)
    w = make_inputs((batch, seq_q, heads, head_dim), seq_kv, dtype, "contiguous", seed + 1)[3:]
    a, b = coeffs
    mixed = [a * x + b * y for x, y in zip(u, w, strict=True)]
    t_mixed = jvp_of(impl, q, k, v, *mixed)[1]
    t_u, t_w = jvp_of(impl, q, k, v, *u)[1], jvp_of(impl, q, k, v, *w)[1]
    combined = a * t_u + b * t_w
    scale_ref = t_u.norm() * abs(a) + t_w.norm() * abs(b) + 1e-30
    assert ((t_mixed - combined).norm() / scale_ref).item() < 1e-5


def test_zero_tangents_give_zero_tangent(impl):
    """Zero tangents give exactly zero t_o, and o is unchanged (random non-zero primals)."""
    q, k, v, *_ = make_inputs((2, LENGTHS[3], 2, HEAD_DIMS[0]), LENGTHS[4], torch.float32, "bhsd", 5)
    zeros = [torch.zeros_like(x) for x in (q, k, v)]
    out, tout = jvp_of(impl, q, k, v, *zeros)
    assert torch.equal(tout, torch.zeros_like(tout))
    assert rel_err(out, reference.attention_reference(q.double(), k.double(), v.double())) < 1e-5


@pytest.mark.parametrize("dtype_index", [0, 1])
def test_keys_and_values_without_tangent_take_the_four_matmul_variant(impl, dtype_index):
    """tk = tv = None (cross-attention to a text) equals explicit zero tangents and the float64
    reference, directly on the fused op, through torch.func.jvp in q alone, and compiled."""
    dtype = dtypes_for(impl)[dtype_index]
    q, k, v, tq, _, _ = make_inputs((2, LENGTHS[4], 2, HEAD_DIMS[-1]), LENGTHS[5], dtype, "bhsd", 9)
    zeros = [torch.zeros_like(k), torch.zeros_like(v)]
    want_out, want_tangent = float64_jvp(q, k, v, tq, *zeros)
    poison_allocator()
    out, tangent, _ = attention_fwd_jvp(q, k, v, tq, None, None, q.shape[-1] ** -0.5, impl)
    with_zeros = attention_fwd_jvp(q, k, v, tq, *zeros, q.shape[-1] ** -0.5, impl)
    assert rel_err(tangent, with_zeros[1]) < 4 * unit_roundoff(dtype) * LENGTHS[5]
    assert rel_err(out, want_out) < BOUND[dtype] and rel_err(tangent, want_tangent) < BOUND[dtype]
    along_q = lambda q: attention(q, k, v, impl=impl)
    for fn in (along_q, torch.compile(lambda q, t: torch.func.jvp(along_q, (q,), (t,)), fullgraph=True)):
        got = fn(q, tq) if fn is not along_q else torch.func.jvp(along_q, (q,), (tq,))
        assert torch.isfinite(got[1]).all() and rel_err(got[1], want_tangent) < BOUND[dtype]


def test_one_missing_kv_tangent_is_refused():
    q = torch.randn(1, 3, 1, 16)
    with pytest.raises(ValueError, match="both"):
        attention_fwd_jvp(q, q, q, q, None, q, 0.25, "reference")


def test_tangent_matches_central_finite_difference_float64():
    """In float64, t_o equals (f(x + h t) - f(x - h t)) / 2h to O(h^2)."""
    inputs = make_inputs((2, 9, 2, 16), 13, torch.float64, "sliced", 11)
    primals, tangents = inputs[:3], inputs[3:]
    _, tout = jvp_of("reference", *primals, *tangents)
    step = 1e-5
    plus = attention(*(p + step * t for p, t in zip(primals, tangents, strict=True)))
    minus = attention(*(p - step * t for p, t in zip(primals, tangents, strict=True)))
    assert rel_err(tout, (plus - minus) / (2 * step)) < 1e-8


def test_forward_ad_matches_func_jvp(impl):
    """torch.autograd.forward_ad gives the same o and t_o as torch.func.jvp."""
    inputs = make_inputs((1, LENGTHS[4], 3, HEAD_DIMS[-1]), LENGTHS[2], torch.float32, "bhsd", 7)
    out, tout = jvp_of(impl, *inputs)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in zip(inputs[:3], inputs[3:], strict=True)]
        dual_out = attention(*duals, impl=impl)
        fw_out, fw_tout = forward_ad.unpack_dual(dual_out)
    torch.testing.assert_close(fw_out, out, rtol=0, atol=0)
    torch.testing.assert_close(fw_tout, tout, rtol=0, atol=0)


def float64_grads(q, k, v, grad):
    """Gradients of math attention in float64: the yardstick for ours and SDPA's."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    return torch.autograd.grad(reference.attention_reference(*leaves), leaves, grad.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_float64_reference(dtype):
    """Reverse-mode gradients (through attention_fwd/attention_bwd) match float64 autograd."""
    q, k, v, *_ = make_inputs((2, LENGTHS[-1], 2, HEAD_DIMS[-1]), LENGTHS[-2], dtype, "bhsd", 13)
    grad = torch.randn(q.shape, device=DEVICE, dtype=dtype)
    ours = torch.autograd.grad(attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_()), (q, k, v), grad)
    ref = float64_grads(q, k, v, grad)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and rel_err(a, b) < BOUND[dtype]


def test_jvp_primal_keeps_reverse_mode_and_detaches_tangent(impl):
    """Under forward AD with grad enabled, o still backpropagates to q, k, v; t_o has no history."""
    inputs = make_inputs((1, LENGTHS[3], 2, HEAD_DIMS[0]), LENGTHS[5], torch.float32, "contiguous", 17)
    primals = [x.requires_grad_() for x in inputs[:3]]
    out, tout = torch.func.jvp(functools.partial(attention, impl=impl), tuple(primals), tuple(inputs[3:]))
    assert not tout.requires_grad
    grads = torch.autograd.grad(out.sum(), primals)
    ref_in = [x.detach().double().requires_grad_() for x in primals]
    ref = torch.autograd.grad(reference.attention_reference(*ref_in).sum(), ref_in)
    for a, b in zip(grads, ref, strict=True):
        assert rel_err(a, b) < 1e-5


COMPILE_BACKENDS = ["aot_eager", "inductor"]


def _jvp_fn(impl):
    def fn(q, k, v, tq, tk, tv):
        return torch.func.jvp(functools.partial(attention, impl=impl), (q, k, v), (tq, tk, tv))

    return fn


def _forward_ad_fn(impl):
    def fn(q, k, v, tq, tk, tv):
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in ((q, tq), (k, tk), (v, tv))]
            return forward_ad.unpack_dual(attention(*duals, impl=impl))

    return fn


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("mode", ["func_jvp", "forward_ad"])
def test_compiled_jvp_matches_eager(impl, backend, mode):
    """torch.compile(fullgraph=True) around jvp / forward_ad gives eager's o and t_o (pytorch#192985)."""
    torch._dynamo.reset()
    inputs = make_inputs((2, LENGTHS[4], 2, HEAD_DIMS[0]), LENGTHS[3], torch.float32, "bhsd", 19)
    fn = _jvp_fn(impl) if mode == "func_jvp" else _forward_ad_fn(impl)
    eager_out, eager_tout = fn(*inputs)
    out, tout = torch.compile(fn, fullgraph=True, backend=backend)(*inputs)
    ref_out, ref_tout = float64_jvp(*inputs)
    assert rel_err(tout, ref_tout) < 1e-5 and rel_err(out, ref_out) < 1e-5
    torch.testing.assert_close(tout, eager_tout, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_backward_matches_eager(backend):
    """Gradients through torch.compile(fullgraph=True) equal eager ones."""
    torch._dynamo.reset()
    inputs = make_inputs((2, LENGTHS[4], 2, HEAD_DIMS[0]), LENGTHS[5], torch.float32, "sliced", 23)[:3]
    grad = torch.randn(inputs[0].shape, device=DEVICE)

    def grads(fn):
        leaves = [x.detach().requires_grad_() for x in inputs]
        return torch.autograd.grad(fn(*leaves), leaves, grad)

    eager = grads(attention)
    compiled = grads(torch.compile(attention, fullgraph=True, backend=backend))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class TinyAttentionBlock(torch.nn.Module):
    """x -> x + Wo attention(Wq x, Wk ctx, Wv ctx): self- and cross-attention in one small module."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.kv_ctx = torch.nn.Linear(dim, 2 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, ctx, impl):
        batch, seq, dim = x.shape
        split = lambda t: t.unflatten(-1, (self.heads, -1))
        q, k, v = (split(t) for t in self.qkv(x).chunk(3, dim=-1))  # strided views, no copies
        x = x + self.out(attention(q, k, v, impl=impl).flatten(2))
        k_ctx, v_ctx = (split(t) for t in self.kv_ctx(ctx).chunk(2, dim=-1))
        return x + self.out(attention(split(x), k_ctx, v_ctx, impl=impl).flatten(2))


def test_model_under_compiled_jvp_matches_eager(impl):
    """torch.compile(torch.func.jvp(functional_call(model))) matches eager and float64 math."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dim, heads = 2 * HEAD_DIMS[0], 2
    model = TinyAttentionBlock(dim, heads).to(DEVICE)
    params = dict(model.named_parameters())
    x, tx = torch.randn(2, LENGTHS[4], dim, device=DEVICE), torch.randn(2, LENGTHS[4], dim, device=DEVICE)
    ctx = torch.randn(2, LENGTHS[2], dim, device=DEVICE)

    def tangent_of(x, tx):
        with torch.no_grad():
            fn = lambda x: torch.func.functional_call(model, params, (x, ctx, impl))
            return torch.func.jvp(fn, (x,), (tx,))

    eager = tangent_of(x, tx)
    compiled = torch.compile(tangent_of, fullgraph=True)(x, tx)
    params64 = {name: p.detach().double() for name, p in params.items()}
    ref = torch.func.jvp(
        lambda x: torch.func.functional_call(model, params64, (x, ctx.double(), "reference")),
        (x.double(),),
        (tx.double(),),
    )
    for a, b, r in zip(compiled, eager, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert rel_err(a, r) < 1e-5


def _opcheck_inputs(dtype=torch.float32):
    return make_inputs((2, LENGTHS[3], 2, HEAD_DIMS[0]), LENGTHS[4], dtype, "bhsd", 29)


def test_attention_fwd_passes_opcheck():
    q, k, v, *_ = _opcheck_inputs()
    torch.library.opcheck(attention_fwd, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.3))


def test_attention_bwd_passes_opcheck():
    q, k, v, grad, *_ = _opcheck_inputs()
    out, lse = attention_fwd(q, k, v, 0.3)
    torch.library.opcheck(attention_bwd, (grad, q, k, v, out, lse, 0.3))


def test_attention_fwd_jvp_passes_opcheck(impl):
    inputs = _opcheck_inputs()
    inputs[0].requires_grad_()
    torch.library.opcheck(attention_fwd_jvp, (*inputs, 0.3, impl))


def test_attention_entry_op_passes_opcheck(impl):
    q, k, v, *_ = _opcheck_inputs()
    torch.library.opcheck(torch.ops.rcmfn.attention.default, (q.requires_grad_(), k, v, 0.3, impl))


@pytest.mark.skipif(ON_GPU or TRITON_RUNS_HERE or not TRITON, reason="the Triton tests already run in this process")
@pytest.mark.skipif(bool(interpreter_defect()), reason=interpreter_defect() + ": use triton >= 3.9 or numpy < 2.4")
def test_triton_kernel_under_interpreter():
    """This file's impl="triton" tests pass in a child process with TRITON_INTERPRET=1 (CPU)."""
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "triton"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]


@pytest.mark.skipif(not TRITON, reason="needs triton")
@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 2**22), other=st.integers(1, 2**22))
def test_triton_autotune_key_buckets_lengths(length, other):
    """Lengths within a factor of two (above 1024) share one autotuning key; the key is monotone."""
    from ops.attention.kernel import length_bucket

    bucket = length_bucket(length)
    assert bucket & (bucket - 1) == 0 and bucket >= max(1024, length)
    assert length <= 1024 or bucket < 2 * length
    if other <= length:
        assert length_bucket(other) <= bucket


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 5, 2, 16), (2, 7, 2, 16), (2, 7, 2, 8)), "same shape"),
        (((2, 5, 2, 16), (2, 7, 3, 16), (2, 7, 3, 16)), "agree"),
        (((5, 2, 16), (7, 2, 16), (7, 2, 16)), r"\(B, S, H, D\)"),
    ],
)
def test_bad_shapes_raise_value_error(shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v)


@settings(max_examples=30, deadline=None)
@given(offset=st.integers(0, 7), transposed=st.booleans(), dtype_index=st.integers(0, 2))
def test_dense_gives_the_backends_contiguous_aligned_tensors(offset, transposed, dtype_index):
    """What the CUDA primal path hands SDPA's backends: the same values, contiguous, 16-byte aligned;
    an input that already is so passes through without a copy."""
    from ops.attention.op import _dense

    dtype = (torch.float32, torch.float16, torch.bfloat16)[dtype_index]
    base = torch.randn(2 * 5 * 3 * 16 + offset, dtype=torch.float32).to(dtype)
    x = base[offset:].view(2, 5, 3, 16)
    if transposed:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    dense = _dense(x)
    assert dense.is_contiguous() and dense.data_ptr() % 16 == 0 and torch.equal(dense, x)
    if x.is_contiguous() and x.data_ptr() % 16 == 0:
        assert dense is x


def test_non_positive_scale_raises_value_error():
    q = torch.randn(1, 3, 1, 16)
    with pytest.raises(ValueError, match="scale"):
        attention(q, q, q, scale=-0.5)


def test_unknown_impl_raises_value_error():
    q = torch.randn(1, 3, 1, 16)
    with pytest.raises(ValueError, match="impl"):
        attention(q, q, q, impl="flash")


@gpu
@pytest.mark.parametrize("layout", ["contiguous", "bhsd", "sliced"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seq_q, seq_kv", [(1025, 1025), (777, 512), (1, 333)])
def test_primal_forward_and_backward_match_sdpa_on_gpu(dtype, seq_q, seq_kv, layout):
    """On CUDA the primal op's output equals F.scaled_dot_product_attention's, and its gradients are
    as close to float64 as SDPA's (both measured; the failure message names both errors)."""
    q, k, v, grad, *_ = make_inputs((2, seq_q, 4, 128), seq_kv, dtype, layout, 31)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves)
    ours = torch.autograd.grad(out, leaves, grad)
    # Public SDPA gets dense copies: on torch 2.11 its cuDNN backward faults with "misaligned address"
    # on views at odd offsets (the op copies such views for the same reason, see op._dense).
    sdpa_in = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
    sdpa_out = torch.nn.functional.scaled_dot_product_attention(*sdpa_in)
    theirs = torch.autograd.grad(sdpa_out, sdpa_in, grad.transpose(1, 2).contiguous())
    torch.testing.assert_close(out, sdpa_out.transpose(1, 2))
    exact = float64_grads(q, k, v, grad)
    for name, a, b, want in zip("qkv", ours, theirs, exact, strict=True):
        ours_err, sdpa_err = rel_err(a, want), rel_err(b.transpose(1, 2), want)
        assert torch.isfinite(a).all() and ours_err <= 2 * sdpa_err + 4 * unit_roundoff(dtype), (
            f"d{name}: ours {ours_err:.3g}, SDPA {sdpa_err:.3g} (relative to float64)"
        )


@gpu
@pytest.mark.parametrize("head_dim", [16, 80, 256])
def test_fused_jvp_other_head_dims_on_gpu(head_dim):
    """Head dims that are small, not a power of two, or the largest supported stay within bounds."""
    inputs = make_inputs((2, 333, 3, head_dim), 129, torch.bfloat16, "contiguous", 41)
    out, tout = jvp_of("auto", *inputs)
    ref_out, ref_tout = float64_jvp(*inputs)
    assert rel_err(out, ref_out) < 5e-3 and rel_err(tout, ref_tout) < 5e-3


@gpu
@pytest.mark.full_autotune
def test_fused_jvp_at_model_size_on_gpu():
    """bf16 (1, 4096, 8, 128) self-attention and (1, 4096 / 512) cross-attention within bounds."""
    for seq_kv in (4096, 512):
        inputs = make_inputs((1, 4096, 8, 128), seq_kv, torch.bfloat16, "bhsd", 37)
        out, tout = jvp_of("auto", *inputs)
        ref_out, ref_tout = float64_jvp(*inputs)
        assert rel_err(out, ref_out) < 5e-3 and rel_err(tout, ref_tout) < 5e-3


@gpu
def test_new_lengths_and_head_counts_do_not_recompile_on_gpu(monkeypatch):
    """After one launch, other lengths (1, odd, multiples of 16) and head counts reuse the compiled kernel."""
    import triton

    from ops.attention import kernel

    compiled = []

    def count(*, fn, **_):
        if fn.name == kernel._attention_fwd_jvp_kernel.fn.__name__:
            compiled.append(fn.name)

    def launch(seq_q, seq_kv, heads):
        inputs = make_inputs((1, seq_q, heads, 64), seq_kv, torch.bfloat16, "contiguous", seq_q + seq_kv)
        kernel.attention_fwd_jvp(*inputs, 0.125, config=kernel.FALLBACK_CONFIG)

    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", count)
    launch(1000, 1000, 2)
    assert len(compiled) <= 1
    compiled.clear()
    for seq_q, seq_kv, heads in [(1, 333, 1), (777, 1025, 3), (1024, 16, 2), (17, 4096, 1)]:
        launch(seq_q, seq_kv, heads)
    torch.cuda.synchronize()
    assert compiled == [], f"the kernel compiled again for new lengths: {compiled}"
