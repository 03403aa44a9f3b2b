"""Ulysses context parallelism whose collectives carry forward-mode tangents as well as values.

SPEC-rcm §8.6. A CP group of P ranks holds one sample's tokens in P contiguous chunks:
  block 0's input is cut along the tokens (rank r keeps chunk r), RoPE tables are cut the same way
  in every block; self-attention turns [B, L/P, H, D] into [B, L, H/P, D] with one all-to-all over
  q, k, v stacked, runs the local attention, and turns the output back with a second all-to-all;
  cross-attention stays local (the text is replicated); the last block's output is all-gathered, so
  the head and the loss run on identical full tensors on every rank of the group.

The collectives are `torch.library` ops in the `rcmfn` namespace whose Autograd kernel is the
forward-AD rule (the pattern of ops/attention/op.py): a dual input is unpacked, primal and tangent are
stacked and sent in ONE collective, and the result is re-packed, so `torch.func.jvp` and
`torch.autograd.forward_ad` through a CP-sharded network are exact. Reverse mode is the adjoint:
all-to-all <-> the inverse all-to-all, all-gather <-> reduce-scatter (sum). Every rank of a group
evaluates the same loss, so summed per-rank gradients are P times the gradient: the FSDP reduction
over the (dp_shard x cp) mesh divides by its size, which is that factor (parallel/fsdp.py).

Random draws need no broadcast: the loop derives them from (seed, iteration) and the ranks of a CP
group share their data-parallel rank, hence their seed and their batch (SPEC-rcm §14).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import forward_ad
from torch.distributed.distributed_c10d import _resolve_process_group

_lib = torch.library.Library("rcmfn", "FRAGMENT")
_DUAL_LEVEL = 0  # see ops/attention/op.py: forward AD has one dual level; functorch nests on top


# --------------------------------------------------------------------------------------------
# Plain collectives along a tensor dimension (process group passed by name, as custom ops need).
# --------------------------------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: str) -> torch.Tensor:
    """Chunk p of `scatter_dim` goes to rank p; the received chunks are concatenated along `gather_dim`."""
    pg = _resolve_process_group(group)
    size = pg.size()
    chunks = x.unflatten(scatter_dim, (size, -1)).movedim(scatter_dim, 0).contiguous()
    received = torch.empty_like(chunks)
    dist.all_to_all_single(received, chunks, group=pg)
    return received.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1).contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    pg = _resolve_process_group(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((pg.size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=pg)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    pg = _resolve_process_group(group)
    chunks = x.unflatten(dim, (pg.size(), -1)).movedim(dim, 0).contiguous()
    out = chunks.new_empty(chunks.shape[1:])
    dist.reduce_scatter_tensor(out, chunks.flatten(0, 1), group=pg)
    return out


def _scaled_shape(shape, dim: int, factor: float) -> list[int]:
    shape = list(shape)
    shape[dim] = int(shape[dim] * factor)
    return shape


@torch.library.custom_op("rcmfn::cp_all_to_all_base", mutates_args=())
def cp_all_to_all_base(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: str) -> torch.Tensor:
    return _all_to_all(x, scatter_dim, gather_dim, group)


@cp_all_to_all_base.register_fake
def _(x, scatter_dim, gather_dim, group):
    size = _resolve_process_group(group).size()
    shape = _scaled_shape(_scaled_shape(x.shape, scatter_dim, 1 / size), gather_dim, size)
    return x.new_empty(shape)


@torch.library.custom_op("rcmfn::cp_all_gather_base", mutates_args=())
def cp_all_gather_base(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return _all_gather(x, dim, group)


@cp_all_gather_base.register_fake
def _(x, dim, group):
    return x.new_empty(_scaled_shape(x.shape, dim, _resolve_process_group(group).size()))


@torch.library.custom_op("rcmfn::cp_reduce_scatter_base", mutates_args=())
def cp_reduce_scatter_base(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    return _reduce_scatter(x, dim, group)


@cp_reduce_scatter_base.register_fake
def _(x, dim, group):
    return x.new_empty(_scaled_shape(x.shape, dim, 1 / _resolve_process_group(group).size()))


def _save_args(ctx, inputs, output):
    ctx.args = inputs[1:]


cp_all_to_all_base.register_autograd(
    lambda ctx, g: (cp_all_to_all_base(g, ctx.args[1], ctx.args[0], ctx.args[2]), None, None, None),
    setup_context=_save_args,
)
cp_all_gather_base.register_autograd(
    lambda ctx, g: (cp_reduce_scatter_base(g, *ctx.args), None, None), setup_context=_save_args
)
cp_reduce_scatter_base.register_autograd(
    lambda ctx, g: (cp_all_gather_base(g, *ctx.args), None, None), setup_context=_save_args
)


# --------------------------------------------------------------------------------------------
# Entry ops: forward-AD rule on the Autograd kernel (primal and tangent in one collective).
# --------------------------------------------------------------------------------------------

_lib.define("cp_all_to_all(Tensor x, int scatter_dim, int gather_dim, str group) -> Tensor")
_lib.define("cp_all_gather(Tensor x, int dim, str group) -> Tensor")


def _with_tangent(x: torch.Tensor, collective, *dims_and_group):
    """Run `collective(x, *dims, group)`, carrying x's forward-mode tangent (if any) in the same call."""
    primal, tangent = forward_ad.unpack_dual(x, level=_DUAL_LEVEL)
    if tangent is None:
        return collective(x, *dims_and_group)
    *dims, group = dims_and_group
    both = collective(torch.stack([primal, tangent.detach()]), *[d + 1 for d in dims], group)
    return forward_ad.make_dual(both[0], both[1], level=_DUAL_LEVEL)


def _all_to_all_autograd(x, scatter_dim, gather_dim, group):
    return _with_tangent(x, cp_all_to_all_base, scatter_dim, gather_dim, group)


def _all_gather_autograd(x, dim, group):
    return _with_tangent(x, cp_all_gather_base, dim, group)


_lib.impl("cp_all_to_all", lambda x, s, g, group: cp_all_to_all_base(x, s, g, group), "CompositeExplicitAutograd")
_lib.impl("cp_all_to_all", _all_to_all_autograd, "Autograd")
_lib.impl("cp_all_gather", lambda x, d, group: cp_all_gather_base(x, d, group), "CompositeExplicitAutograd")
_lib.impl("cp_all_gather", _all_gather_autograd, "Autograd")


@torch.library.register_fake("rcmfn::cp_all_to_all", lib=_lib)
def _(x, scatter_dim, gather_dim, group):
    size = _resolve_process_group(group).size()
    return x.new_empty(_scaled_shape(_scaled_shape(x.shape, scatter_dim, 1 / size), gather_dim, size))


@torch.library.register_fake("rcmfn::cp_all_gather", lib=_lib)
def _(x, dim, group):
    return x.new_empty(_scaled_shape(x.shape, dim, _resolve_process_group(group).size()))


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Ulysses all-to-all: x's `scatter_dim` is cut in group-size chunks, `gather_dim` concatenated.

    Differentiable in reverse mode (adjoint: the inverse all-to-all) and forward mode (tangent sent in
    the same collective). Both dims index x's own dimensions (non-negative).
    """
    return torch.ops.rcmfn.cp_all_to_all(x, scatter_dim, gather_dim, group.group_name)


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate the group's x along `dim` in rank order; adjoint: reduce-scatter (sum); tangents too."""
    return torch.ops.rcmfn.cp_all_gather(x, dim, group.group_name)


# --------------------------------------------------------------------------------------------
# Ulysses attention and the token split of a model's blocks.
# --------------------------------------------------------------------------------------------


def ulysses_attention(attention_fn, group: dist.ProcessGroup):
    """attention over the group's full sequence for q, k, v [B, L/P, H, D] holding a local chunk each.

    One all-to-all moves q, k, v (stacked) to [B, L, H/P, D]; the local heads attend over all tokens;
    a second all-to-all returns [B, L/P, H, D]. Heads must divide by the group size.
    """

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[2] % group.size():
            raise ValueError(f"context-parallel size {group.size()} must divide the heads ({q.shape[2]})")
        full = all_to_all(torch.stack([q, k, v]), scatter_dim=3, gather_dim=2, group=group)
        out = attention_fn(*full.unbind(0))
        return all_to_all(out, scatter_dim=1, gather_dim=2, group=group)

    return attend


def token_dim(x: torch.Tensor) -> int:
    """The dimension of a block's input that holds the tokens CP cuts: the one before the features, in
    every family's block layout (Wan [B, L, D]: all tokens; Cosmos [B, T', S, D]: the tokens of a frame)."""
    return x.dim() - 2


def check_cp_size(spec, cp: int, latent_shape: tuple[int, int, int, int]) -> None:
    """ValueError unless `cp` divides the heads and the CP-cut token count of a [C, T, H, W] latent.

    `spec` is a rcmfn.models.registry.ModelSpec: Wan cuts all T'H'W' tokens, Cosmos the H'W' tokens of each
    latent frame (its blocks hold [B, T', S, D]); `spec.cp_tokens` knows which.
    """
    cut = spec.cp_tokens(latent_shape)
    what = "tokens T'H'W'" if spec.family.cp_axes == 3 else "tokens per frame H'W'"
    if spec.config.num_heads % cp:
        raise ValueError(f"context-parallel size {cp} must divide the attention heads ({spec.config.num_heads})")
    if cut % cp:
        raise ValueError(f"context-parallel size {cp} must divide the {what} ({cut}) of latent {latent_shape}")


def _local_rows(table: torch.Tensor, grid: tuple[int, ...], axis: int, rank: int, size: int) -> torch.Tensor:
    """Rows of a RoPE table [prod(grid), ...] belonging to chunk `rank` of `axis` of the token grid."""
    chunk = grid[axis] // size
    return table.unflatten(0, grid).narrow(axis, rank * chunk, chunk).flatten(0, len(grid) - 1)


def apply_cp(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Make `model` (a net whose `blocks` take (x, ..., rope_cos, rope_sin) with the tokens CP cuts on
    axis `token_dim(x)`: WanModel, CosmosDiT) run its blocks on this rank's chunk of the tokens.

    In place, by forward hooks on `model.blocks` and by swapping the self-attention's attention call;
    parameter names are unchanged. Apply before activation checkpointing, compile and FSDP.
    """
    size, rank = group.size(), group.rank()
    blocks = list(model.blocks)
    # One Ulysses wrapper per distinct attention function, shared by the blocks: a compiled block
    # guards on the identity of the function it calls, and a wrapper per block made Dynamo compile
    # every block anew (recompile limit 8, fullgraph: a hard failure with --compile under CP).
    ulysses = {}
    for block in blocks:
        base = block.self_attn.attention_fn
        if base not in ulysses:
            ulysses[base] = ulysses_attention(base, group)
        block.self_attn.attention_fn = ulysses[base]

    def cut_inputs(first: bool):
        def hook(module, args):
            x, *middle, rope_cos, rope_sin = args
            dim, grid = token_dim(x), list(x.shape[1:-1])
            if first:
                if grid[dim - 1] % size:
                    raise ValueError(f"context-parallel size {size} must divide the token axis ({grid[dim - 1]})")
                chunk = grid[dim - 1] // size
                x = x.narrow(dim, rank * chunk, chunk)
            else:
                grid[dim - 1] *= size
            rope = [_local_rows(r, tuple(grid), dim - 1, rank, size) for r in (rope_cos, rope_sin)]
            # A per-token input (Wan2.2 TI2V's modulation from per-token timesteps, [B, L, 6, D] beside the
            # tokens [B, L, D]: one axis more, the same leading token axes) is cut like the tokens.
            full = [*x.shape[:dim], grid[dim - 1]]
            middle = [
                m.narrow(dim, rank * (grid[dim - 1] // size), grid[dim - 1] // size)
                if isinstance(m, torch.Tensor) and m.dim() == x.dim() + 1 and list(m.shape[: dim + 1]) == full
                else m
                for m in middle
            ]
            return (x, *middle, *rope)

        return hook

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(cut_inputs(first=i == 0))
    blocks[-1].register_forward_hook(lambda module, args, out: all_gather(out, token_dim(out), group))
    return model
