"""A compiled tangent for a block called on dual tensors: its JVP as an inductor-compiled aten graph.

Why (docs/scale.md): the sharded sCM tangent pass feeds forward-AD dual tensors to each block. Inside
that active forward-AD level an inductor-compiled block drops the tangents, and neither
`torch.func.jvp` (eager or compiled) nor `make_fx` of it can run ("Nested forward mode AD is not
supported"). What does run there is a plain aten graph: the block's JVP traced by `make_fx` over
`torch.func.jvp` *outside* any level, its products with zero tangents removed, compiled by inductor's
`compile_fx`, and called on the unpacked primals and tangents.

Life cycle, per block (`BlockJVP`): a dual call with a signature (shapes, strides, dtypes, which inputs carry a
tangent) that has no graph yet runs the eager block and records the signature; the next plain call
with the same shapes (the step's student forward, outside any level) traces and compiles the graph;
later dual calls with that signature run it. Parameters and buffers are graph inputs read from the
module at call time, never constants baked into the graph (FSDP swaps in freshly gathered ones).

One graph serves every identical block (`JVPGraphs`, shared by a model's blocks): tracing is per block
otherwise, and make_fx over torch.func.jvp is slow -- with 28 Cosmos 2B blocks it was most of a
restarted job's 31 s first student iteration (H200, inductor's caches warm).
"""

import inspect
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd import forward_ad
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.nn.utils.stateless import _reparametrize_module

from rcmfn.compile import compile_graph

aten = torch.ops.aten
EAGER = "eager"  # a signature whose JVP could not be traced: its dual calls run the eager block


class TangentCompileError(RuntimeError):
    """A block's JVP could not be traced for compilation and the eager fallback was not allowed."""


def eager_tangent_blocks(model: nn.Module) -> int:
    """How many of `model`'s compiled blocks run (some of) their tangent calls eagerly (allowed fallback)."""
    jvps = [getattr(block.forward, "block_jvp", None) for block in getattr(model, "blocks", ())]
    return sum(1 for j in jvps if j is not None and EAGER in j.compiled.values())


# Where make_fx's trace of torch.func.jvp materialises the zero tangent of a tensor without one (a
# weight): products with it are zero and sums with it are the other operand.
_ZERO_SOURCES = {aten.zeros.default, aten._efficientzerotensor.default, aten.zeros_like.default, aten.new_zeros.default}
_ZERO_PRESERVING = {
    aten.expand.default,
    aten.t.default,
    aten.permute.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.alias.default,
    aten.clone.default,
    aten._to_copy.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.transpose.int,
    aten.slice.Tensor,
    aten.select.int,
    aten.neg.default,
}
_PRODUCTS = {aten.mm.default, aten.bmm.default, aten.mul.Tensor, aten.matmul.default}


def prune_zero_products(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace products with a materialised zero by zeros, and x + 0 by x; drop what becomes dead.

    Exact: a product with a zero factor is zero (finite inputs), a sum with zero is the other term.
    """
    graph = gm.graph
    zero = set()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if node.target in _ZERO_SOURCES:
            zero.add(node)
        elif node.target in _ZERO_PRESERVING and operands and operands[0] in zero:
            zero.add(node)
        elif node.target in _PRODUCTS and any(a in zero for a in operands):
            value = node.meta["val"]
            with graph.inserting_before(node):
                zeros = graph.call_function(
                    aten.zeros.default, (list(value.shape),), {"dtype": value.dtype, "device": value.device}
                )
            zeros.meta["val"] = value
            zero.add(zeros)
            node.replace_all_uses_with(zeros)
            graph.erase_node(node)
        elif node.target in (aten.add.Tensor, aten.sub.Tensor) and len(node.args) == 2 and not node.kwargs:
            _fold_zero_sum(graph, node, zero)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _fold_zero_sum(graph: torch.fx.Graph, node: torch.fx.Node, zero: set) -> None:
    """a + 0 -> a, 0 + b -> b, a - 0 -> a where the result has the kept operand's shape and dtype."""
    first, second = node.args
    value = node.meta["val"]
    candidates = [(first, second)] if node.target == aten.sub.Tensor else [(first, second), (second, first)]
    for keep, drop in candidates:
        if drop in zero and isinstance(keep, torch.fx.Node):
            kept = keep.meta["val"]
            if kept.shape == value.shape and kept.dtype == value.dtype:
                node.replace_all_uses_with(keep)
                graph.erase_node(node)
                return
    if first in zero and second in zero:
        zero.add(node)


def _primal_signature(module: nn.Module, primals: list) -> tuple:
    """Parameters' and inputs' shapes, strides, dtypes and devices (non-tensor inputs by value)."""
    state = [(n, tuple(t.shape), t.stride(), t.dtype, t.device) for n, t in _state(module).items()]
    inputs = [
        (tuple(p.shape), p.stride(), p.dtype, p.device) if isinstance(p, torch.Tensor) else ("const", p)
        for p in primals
    ]
    return tuple(state), tuple(inputs)


def _signature(module: nn.Module, primals: list, tangents: list) -> tuple:
    """What a compiled graph is specialised to: the primal signature and, per input, its tangent's
    strides (None: the input carries no tangent)."""
    return _primal_signature(module, primals), tuple(None if t is None else t.stride() for t in tangents)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def trace_block_jvp(
    module: nn.Module, forward: Callable, primals: list, tangent_strides: list, backend: str = "inductor"
) -> Callable:
    """Compile the JVP of `forward` (the module's own forward) in the inputs whose `tangent_strides`
    entry is not None (the tangents' layout: inductor's graph checks every input's strides).

    Returns `run(*state, *tensor_primals, *tangents) -> (out, out_tangent)`; the graph takes the
    module's parameters and buffers (in `_state` order) as inputs. backend "inductor" compiles the
    graph; any other (the tests' "aot_eager") runs the traced aten graph as it is.
    """
    names = list(_state(module))
    tensor_at = [i for i, p in enumerate(primals) if isinstance(p, torch.Tensor)]
    tangent_at = [i for i in tensor_at if tangent_strides[i] is not None]

    def block_jvp(*flat):
        state, rest = flat[: len(names)], flat[len(names) :]
        tensors, tangents = rest[: len(tensor_at)], rest[len(tensor_at) :]
        args = list(primals)
        for i, t in zip(tensor_at, tensors, strict=True):
            args[i] = t

        def along(*differentiated):
            called = list(args)
            for i, d in zip(tangent_at, differentiated, strict=True):
                called[i] = d
            return forward(*called)

        with _reparametrize_module(module, dict(zip(names, state, strict=True))):
            return torch.func.jvp(along, tuple(args[i] for i in tangent_at), tuple(tangents))

    example = [
        *(t.detach() for t in _state(module).values()),
        *(primals[i].detach() for i in tensor_at),
        *(
            torch.empty_strided(primals[i].shape, tangent_strides[i], dtype=primals[i].dtype, device=primals[i].device)
            for i in tangent_at
        ),
    ]
    with torch.no_grad():
        graph = prune_zero_products(make_fx(block_jvp, tracing_mode="fake")(*example))
        if backend != "inductor":
            return graph
        # Inductor caches a compiled graph only under a tracing context whose fake mode has a shape env
        # (it bypasses its cache with "No shape env" otherwise): without one, each of a network's
        # identical blocks compiled its JVP graph from scratch.
        with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
            return compile_graph(graph, example)


_PLAIN = (bool, int, float, str, tuple, type(None))


def structure_key(module: nn.Module, forward: Callable) -> tuple:
    """What decides the graph a block traces to, besides the signature: the forward's code, and every
    submodule's type and plain attributes (eps, head counts, flags). Blocks equal in all of it (the
    repeated blocks of a DiT) trace to the same graph, their parameters being graph inputs."""
    function = inspect.unwrap(forward)
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    parts = [code]
    for name, sub in module.named_modules():
        attrs = sorted((k, repr(v)) for k, v in vars(sub).items() if not k.startswith("_") and isinstance(v, _PLAIN))
        parts.append((name, type(sub), tuple(attrs)))
    return tuple(parts)


class JVPGraphs(dict):
    """Compiled JVP graphs shared by a model's blocks: (structure_key, signature) -> graph."""


class BlockJVP:
    """Per-block cache of compiled JVP graphs, filled on plain calls for signatures dual calls asked for;
    a graph traced for an identical block (`shared`) is reused rather than traced again."""

    def __init__(
        self,
        module: nn.Module,
        forward: Callable,
        backend: str = "inductor",
        allow_eager: bool = False,
        shared: JVPGraphs | None = None,
    ):
        self.module, self.forward, self.backend, self.allow_eager = module, forward, backend, allow_eager
        self.compiled: dict[tuple, Callable] = {}
        self.wanted: set[tuple] = set()
        self.shared = JVPGraphs() if shared is None else shared
        self.structure = structure_key(module, forward)

    def dual_call(self, args: tuple) -> torch.Tensor:
        """The block on dual inputs: the compiled JVP if there is one for them, else the eager block.

        With grad enabled the eager block runs: the compiled graph's outputs carry no autograd history
        (the sCM tangent pass runs without grad)."""
        if torch.is_grad_enabled():
            return self.forward(*args)
        unpacked = [forward_ad.unpack_dual(a) if isinstance(a, torch.Tensor) else (a, None) for a in args]
        primals = [p for p, _ in unpacked]
        signature = _signature(self.module, primals, [t for _, t in unpacked])
        try:
            run = self.compiled.get(signature)
        except TypeError:  # an unhashable non-tensor input: no graph can be keyed on it
            return self.forward(*args)
        if run is None and (run := self.shared.get((self.structure, signature))) is not None:
            self.compiled[signature] = run
        if run is None:
            self.wanted.add(signature)
        if run is None or run is EAGER:
            return self.forward(*args)
        state = [t.detach() for t in _state(self.module).values()]
        tensors = [p for p in primals if isinstance(p, torch.Tensor)]
        tangents = [t for _, t in unpacked if t is not None]
        out, out_tangent = run(*state, *tensors, *tangents)
        return forward_ad.make_dual(out, out_tangent)

    def plain_call_seen(self, args: tuple) -> None:
        """Compile the graphs dual calls asked for whose shapes match this plain call's inputs."""
        for signature in [s for s in self.wanted if self._matches(s, args)]:
            if (graph := self.shared.get((self.structure, signature))) is not None:
                self.compiled[signature] = graph
                self.wanted.discard(signature)
                continue
            try:
                graph = trace_block_jvp(self.module, self.forward, list(args), list(signature[1]), self.backend)
            except Exception as error:  # noqa: BLE001 -- any tracing failure: stop, or stay exact and eager
                # Seen: make_fx of a context-parallel block (all-to-all views) trips an internal
                # forward-AD view assert in torch 2.13. The eager block is exact, only slower -- but a
                # silently slower tangent pass is not what --compile asked for, so it must be allowed.
                what = (
                    f"{type(self.module).__name__}: its JVP could not be traced for compilation "
                    f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                )
                if not self.allow_eager:
                    raise TangentCompileError(
                        f"{what}. Run without --compile, or allow the exact but slower eager tangent pass for "
                        "such blocks with --distributed.allow-eager-tangent (counted as eager_tangent_blocks "
                        "in the metrics)"
                    ) from error
                warnings.warn(f"{what}; dual calls stay eager (allowed)", stacklevel=2)
                graph = EAGER
            self.compiled[signature] = self.shared[(self.structure, signature)] = graph
            self.wanted.discard(signature)

    def _matches(self, signature: tuple, args: tuple) -> bool:
        """The plain call's inputs are those the signature was recorded for."""
        return len(signature[1]) == len(args) and _primal_signature(self.module, list(args)) == signature[0]
