"""Per-block compile (parallel.parallelize.apply_compile) keeps forward-mode tangents exact.

A block compiled with inductor and called on dual tensors sees the primals only (the tangents are
dropped without an error; aot_eager keeps them); apply_compile now runs such calls eagerly. Single process, CPU:
the tangent of the whole net through per-block compiled blocks (dual numbers, as the sharded sCM
tangent pass feeds them) equals torch.func.jvp of the eager net; primal outputs and gradients are
unchanged.
"""

import copy

import pytest
import torch

from parallel.fsdp import dual_jvp
from parallel.parallelize import apply_ac, apply_compile
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
