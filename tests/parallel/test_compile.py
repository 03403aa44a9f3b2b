"""Per-block compile (parallel.parallelize.apply_compile) keeps forward-mode tangents exact.

A block compiled with inductor and called on dual tensors sees the primals only (the tangents are
dropped without an error; aot_eager keeps them); apply_compile sends such calls to the block's
compiled JVP graph (parallel/block_jvp.py), or to the eager block until a plain call has compiled it.
Single process, CPU: the tangent of the whole net through per-block compiled blocks (dual numbers, as
the sharded sCM tangent pass feeds them) equals torch.func.jvp of the eager net, before and after the
JVP graphs exist and after the weights change; primal outputs and gradients are unchanged.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from parallel.block_jvp import prune_zero_products
from parallel.parallelize import apply_ac, apply_compile
from rcmfn.tangent import dual_jvp
from tests.parallel.parallel_harness import tiny_batch, tiny_model


def _inputs(family):
    x, context, _ = tiny_batch(family, batch=2)
    g = torch.Generator().manual_seed(7)
    t = torch.rand(2, generator=g, dtype=torch.float64).to(x.dtype)
    if family == "wan":
        t = 1000 * t
    tx, tt = torch.randn(x.shape, generator=g, dtype=x.dtype), torch.rand(2, generator=g, dtype=x.dtype)
    return x, t, context, tx, tt


@pytest.mark.parametrize(
    "family, backend, ac",
    [("cosmos", "aot_eager", "none"), ("wan", "aot_eager", "full"), ("cosmos", "inductor", "mm_only")],
)
def test_per_block_compiled_tangent_equals_eager_jvp(family, backend, ac):
    eager = tiny_model(family)
    compiled = apply_compile(apply_ac(copy.deepcopy(eager), ac), backend=backend)
    x, t, context, tx, tt = _inputs(family)
    with torch.no_grad():
        want, want_tangent = torch.func.jvp(lambda x, t: eager(x, t, context), (x, t), (tx, tt))
        for _ in range(2):  # the first call compiles, the second runs the cached graphs
            got, got_tangent = dual_jvp(lambda x, t: compiled(x, t, context), (x, t), (tx, tt))
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got_tangent, want_tangent, rtol=1e-9, atol=1e-11)
    assert want_tangent.abs().mean() > 1e-3
    # Reverse mode through the same compiled blocks: gradients equal the eager ones.
    loss = lambda m: m(x, t, context).square().mean()
    grads = torch.autograd.grad(loss(compiled), list(compiled.parameters()))
    want_grads = torch.autograd.grad(loss(eager), list(eager.parameters()))
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_without_the_guard_compiled_blocks_drop_tangents():
    """The failure the guard exists for, kept visible: plain torch.compile (inductor) of each block."""
    eager = tiny_model("cosmos")
    bare = copy.deepcopy(eager)
    for block in bare.blocks:
        block.forward = torch.compile(block.forward, fullgraph=True, backend="inductor")
    x, t, context, tx, tt = _inputs("cosmos")
    with torch.no_grad():
        _, want_tangent = torch.func.jvp(lambda x, t: eager(x, t, context), (x, t), (tx, tt))
        _, got_tangent = dual_jvp(lambda x, t: bare(x, t, context), (x, t), (tx, tt))
    assert (got_tangent - want_tangent).norm() > 0.1 * want_tangent.norm()


def _matmuls(graph: torch.fx.GraphModule) -> int:
    ops = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)
    return sum(1 for node in graph.graph.nodes if node.op == "call_function" and node.target in ops)


@pytest.mark.parametrize("family, backend", [("cosmos", "aot_eager"), ("wan", "inductor")])
def test_dual_calls_run_the_compiled_block_jvp_after_a_plain_call(family, backend):
    eager = tiny_model(family)
    compiled = apply_compile(copy.deepcopy(eager), backend=backend)
    caches = [block.forward.block_jvp for block in compiled.blocks]
    x, t, context, tx, tt = _inputs(family)

    def check():
        with torch.no_grad():
            want, want_tangent = torch.func.jvp(lambda x, t: eager(x, t, context), (x, t), (tx, tt))
            got, got_tangent = dual_jvp(lambda x, t: compiled(x, t, context), (x, t), (tx, tt))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_tangent, want_tangent, rtol=1e-9, atol=1e-11)
        assert want_tangent.abs().mean() > 1e-3

    check()  # no graph yet: the eager blocks, and each block records what it was asked for
    assert all(len(c.wanted) == 1 and not c.compiled for c in caches)
    compiled(x, t, context).sum().backward()  # a plain call (with grad, as the student's) compiles them
    assert all(not c.wanted and len(c.compiled) == 1 for c in caches)

    runs = []
    for c in caches:
        ((signature, run),) = c.compiled.items()
        c.compiled[signature] = lambda *a, run=run: runs.append(1) or run(*a)
    check()
    assert len(runs) == len(caches), "the dual calls did not run the compiled JVP graphs"
    # Parameters are graph inputs read at call time, not constants: new weights, new tangents.
    with torch.no_grad():
        for model in (eager, compiled):
            for p in model.parameters():
                p.mul_(1.25).add_(0.01)
    check()
    assert len(runs) == 2 * len(caches)


def test_identical_blocks_share_one_traced_jvp_graph(monkeypatch):
    """A network's identical blocks trace and compile their JVP graph once, not once per block: make_fx
    over torch.func.jvp per block was most of a restarted job's first iteration (28 Cosmos 2B blocks).
    The shared graph gives every block its own exact tangent (parameters are graph inputs)."""
    from parallel import block_jvp

    traced, trace = [], block_jvp.trace_block_jvp
    monkeypatch.setattr(block_jvp, "trace_block_jvp", lambda *a, **k: traced.append(1) or trace(*a, **k))
    eager = tiny_model("wan")
    model = apply_compile(copy.deepcopy(eager), backend="inductor")
    x, t, context, tx, tt = _inputs("wan")
    with torch.no_grad():
        dual_jvp(lambda x, t: model(x, t, context), (x, t), (tx, tt))
        counters.clear()
        model(x, t, context)  # compiles the block forwards and the one JVP graph
        got, got_tangent = dual_jvp(lambda x, t: model(x, t, context), (x, t), (tx, tt))
        want, want_tangent = torch.func.jvp(lambda x, t: eager(x, t, context), (x, t), (tx, tt))
    assert len(model.blocks) >= 2 and len(traced) == 1
    graphs = {id(g) for b in model.blocks for g in b.forward.block_jvp.compiled.values()}
    assert len(graphs) == 1
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_tangent, want_tangent, rtol=1e-9, atol=1e-11)
    assert want_tangent.abs().mean() > 1e-3


def test_blocks_that_differ_in_a_plain_attribute_trace_their_own_graphs(monkeypatch):
    """Sharing is keyed on each submodule's type and plain attributes too: a block with another eps (or
    any other flag its forward reads) must not run a graph traced for its neighbour."""
    from parallel import block_jvp

    traced, trace = [], block_jvp.trace_block_jvp
    monkeypatch.setattr(block_jvp, "trace_block_jvp", lambda *a, **k: traced.append(1) or trace(*a, **k))
    eager = tiny_model("cosmos")
    changed = [m for m in eager.blocks[1].modules() if isinstance(getattr(m, "eps", None), float)]
    assert changed, "the tiny Cosmos block has no module with an eps to vary"
    for m in changed:
        m.eps = 0.25  # large enough to move the output
    model = apply_compile(copy.deepcopy(eager), backend="aot_eager")
    x, t, context, tx, tt = _inputs("cosmos")
    with torch.no_grad():
        dual_jvp(lambda x, t: model(x, t, context), (x, t), (tx, tt))
        model(x, t, context)
        _, got_tangent = dual_jvp(lambda x, t: model(x, t, context), (x, t), (tx, tt))
        _, want_tangent = torch.func.jvp(lambda x, t: eager(x, t, context), (x, t), (tx, tt))
    assert len(traced) == len(model.blocks) == 2
    torch.testing.assert_close(got_tangent, want_tangent, rtol=1e-9, atol=1e-11)


def test_a_block_whose_jvp_cannot_be_traced_stops_unless_eager_is_allowed(monkeypatch):
    """A tracing failure (seen: context-parallel blocks, a forward-AD view assert in make_fx) stops the
    run by default, naming the flag; allowed, it is reported once per signature, leaves the block's dual
    calls on the eager forward (exact), and `eager_tangent_blocks` counts the blocks for the metrics."""
    from parallel import block_jvp

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot trace this block")

    monkeypatch.setattr(block_jvp, "trace_block_jvp", refuse)
    eager = tiny_model("cosmos")
    x, t, context, tx, tt = _inputs("cosmos")
    strict = apply_compile(copy.deepcopy(eager), backend="aot_eager")
    with torch.no_grad():
        dual_jvp(lambda x, t: strict(x, t, context), (x, t), (tx, tt))
        with pytest.raises(block_jvp.TangentCompileError, match="allow-eager-tangent"):
            strict(x, t, context)
    compiled = apply_compile(copy.deepcopy(eager), backend="aot_eager", allow_eager_tangent=True)
    with torch.no_grad():
        want, want_tangent = torch.func.jvp(lambda x, t: eager(x, t, context), (x, t), (tx, tt))
        dual_jvp(lambda x, t: compiled(x, t, context), (x, t), (tx, tt))
        assert block_jvp.eager_tangent_blocks(compiled) == 0
        with pytest.warns(UserWarning, match="cannot trace this block"):
            compiled(x, t, context)
        got, got_tangent = dual_jvp(lambda x, t: compiled(x, t, context), (x, t), (tx, tt))
    assert all(list(b.forward.block_jvp.compiled.values()) == [block_jvp.EAGER] for b in compiled.blocks)
    assert block_jvp.eager_tangent_blocks(compiled) == len(compiled.blocks) == 2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_tangent, want_tangent, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("family", ["cosmos", "wan"])
def test_block_jvp_graph_has_one_tangent_matmul_per_matmul_on_a_tangent(family):
    """Pruning the zero tangents of the weights leaves exactly one tangent matmul for each forward
    matmul that depends on an input carrying a tangent (not the text's key and value projections)."""
    model = tiny_model(family)
    compiled = apply_compile(copy.deepcopy(model), backend="aot_eager")
    x, t, context, tx, tt = _inputs(family)
    with torch.no_grad():
        dual_jvp(lambda x, t: compiled(x, t, context), (x, t), (tx, tt))
        compiled(x, t, context)
    cache = compiled.blocks[0].forward.block_jvp
    (((_, tangent_strides), jvp_graph),) = cache.compiled.items()
    carries = [strides is not None for strides in tangent_strides]
    inputs = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: inputs.extend(args))
    with torch.no_grad():
        model(x, t, context)
    forward_graph = make_fx(model.blocks[0])(*inputs)
    placeholders = [n for n in forward_graph.graph.nodes if n.op == "placeholder"]
    on_tangent = {n for n, c in zip(placeholders, carries, strict=True) if c}
    for node in forward_graph.graph.nodes:
        if any(a in on_tangent for a in node.all_input_nodes):
            on_tangent.add(node)
    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)
    tangent_matmuls = sum(1 for n in on_tangent if n.op == "call_function" and n.target in matmuls)
    assert 0 < tangent_matmuls < _matmuls(forward_graph)  # some act on the text only
    assert _matmuls(jvp_graph) == _matmuls(forward_graph) + tangent_matmuls
    # Attention's tangent comes from the fused op (the Triton kernel on CUDA), not a decomposition.
    assert any(str(n.target) == "rcmfn.attention_fwd_jvp.default" for n in jvp_graph.graph.nodes)


@settings(max_examples=10, deadline=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_prune_zero_products_keeps_the_values(widths, rows, seed):
    """The JVP graph of a random MLP (weights without tangent) gives the same float64 values pruned
    as unpruned, with exactly one tangent matmul per layer."""
    g = torch.Generator().manual_seed(seed)
    pairs = zip(widths[:-1], widths[1:], strict=True)
    weights = [torch.randn(a, b, generator=g, dtype=torch.float64) for a, b in pairs]
    x, tx = (torch.randn(rows, widths[0], generator=g, dtype=torch.float64) for _ in range(2))

    def mlp(x, *ws):
        for w in ws:
            x = torch.tanh(x @ w) * x.sum()
        return x

    def jvp(x, tx, *ws):
        return torch.func.jvp(lambda x: mlp(x, *ws), (x,), (tx,))

    graph = make_fx(jvp)(x, tx, *weights)
    want = graph(x, tx, *weights)
    pruned = prune_zero_products(graph)
    got = pruned(x, tx, *weights)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[1], torch.func.jvp(lambda x: mlp(x, *weights), (x,), (tx,))[1])
    assert _matmuls(pruned) == 2 * len(weights)
