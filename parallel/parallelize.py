"""Parallelise one network from outside: context parallelism, activation checkpointing, compile, FSDP2.

STYLE example 6 (torchtitan `models/llama3/parallelize.py`): one function per technique and one
`parallelize` that states the order. The order matters:
  1. apply_cp       swaps self-attention for Ulysses and hooks the token split/gather onto the blocks;
  2. apply_ac       wraps each block's forward in (selective) activation checkpointing;
  3. apply_compile  compiles each block's forward (the AC'd one), fullgraph, hooks stay eager, and
                    its JVP for dual-number (tangent) calls (parallel/block_jvp.py);
  4. apply_fsdp     shards each block, then the root; its hooks run around the compiled forward.
Every step leaves parameter names unchanged (no wrapper modules), so checkpoints, the EMA and the
export key maps see the model's own names whatever is switched on.

The device mesh is torchtitan's layout (axes dp_replicate, dp_shard, cp; FSDP over dp_shard x cp,
data over dp_replicate x dp_shard) built directly with `init_device_mesh`: torchtitan's own
`ParallelDims.build_mesh` fixes the device type at import and cannot build the gloo/CPU mesh the tests
run on without a patch, its AC wraps blocks (renaming parameters) and its compile wrapper cannot route
dual-number calls (docs/scale.md, "Why parallel/ does not import torchtitan"; STYLE "what we do not do" 8).
The primitives underneath (DeviceMesh, fully_shard, torch.utils.checkpoint, torch.compile per block) are
the same ones torchtitan uses.
"""

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from parallel.block_jvp import BlockJVP, JVPGraphs
from parallel.context_parallel import apply_cp
from parallel.fsdp import apply_fsdp
from parallel.mesh import Meshes
from rcmfn.compile import compiled

ACMode = Literal["none", "full", "mm_only"]


@dataclass(frozen=True)
class ParallelConfig:
    """How one network is parallelised (the switches of `parallelize`)."""

    param_dtype: torch.dtype | None = None
    """Compute dtype FSDP all-gathers parameters in (None: as stored)."""
    reduce_dtype: torch.dtype | None = torch.float32
    """Dtype of the gradient reduce-scatter."""
    ac: ACMode = "none"
    """Activation checkpointing per block: none, full recomputation, or save matmul/attention outputs."""
    compile: bool = False
    """torch.compile(fullgraph=True) each block's forward, and its JVP for the tangent pass (block_jvp.py)."""
    allow_eager_tangent: bool = False
    """With `compile`: a block whose JVP cannot be traced runs its tangent calls eagerly (exact, slower)
    instead of stopping with TangentCompileError (parallel/block_jvp.py)."""
    reshard_after_forward: bool = True
    """Free all-gathered block parameters after forward (ZeRO-3) rather than keeping them to backward."""


# Ops whose outputs selective AC keeps (SPEC-rcm §8.7 "mm_only": matmuls and attention).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.linear.default,
}


def _mm_only_policy(ctx, op, *args, **kwargs):
    name = str(op)
    if op in _SAVE_OPS or "attention" in name:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, **kwargs):
    """forward under torch.utils.checkpoint when grad is on; as is otherwise.

    Without grad there is nothing to save, and the sCM tangent pass (no grad, dual tensors) must not
    enter checkpoint: torch 2.11's non-reentrant checkpoint applies an autograd.Function without a jvp
    rule to its inputs even under no_grad ("You must implement the jvp function"); guarded by
    tests/parallel/test_fsdp_cp.py cases *_ac_* (run on torch 2.11 and 2.13).
    """

    @functools.wraps(forward)
    def run(*args, **kw):
        if not torch.is_grad_enabled():
            return forward(*args, **kw)
        return checkpoint(forward, *args, **kwargs, **kw)

    return run


def apply_ac(model: nn.Module, mode: ACMode) -> nn.Module:
    """Activation checkpointing of each block's forward (non-reentrant), in place. SPEC-rcm §8.7."""
    if mode == "none":
        return model
    if mode not in ("full", "mm_only"):
        raise ValueError(f"activation checkpointing must be 'none', 'full' or 'mm_only'; got {mode!r}")
    for block in model.blocks:
        kwargs = {"use_reentrant": False, "preserve_rng_state": False}
        if mode == "mm_only":
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _mm_only_policy)
        block.forward = _checkpointed(block.forward, **kwargs)
    return model


def _compiled_block(block: nn.Module, forward, backend: str, allow_eager: bool, shared: JVPGraphs):
    """forward compiled for plain inputs; for inputs carrying forward-AD tangents, the block's JVP graph.

    A function compiled with inductor and called on dual tensors sees their primals only: the
    tangents are dropped without an error (tiny Cosmos net, torch 2.13: output tangent 81 % off in
    float32, 98 % in float64; the aot_eager backend keeps them). And inside the sharded sCM tangent
    pass (rcmfn/tangent.py `dual_jvp`, an active forward-AD level) a compiled torch.func.jvp cannot
    run ("Nested forward mode AD is not supported"). Dual calls therefore go to `BlockJVP`: the first
    one with new shapes runs the eager block, the next plain call compiles the block's JVP graph, and
    later dual calls run that. Guarded by tests/parallel/test_compile.py.
    """
    compiled_forward = compiled(forward, backend)
    tangents = BlockJVP(block, forward, backend, allow_eager, shared)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        carries_tangent = any(
            isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None
            for a in (*args, *kwargs.values())
        )
        if carries_tangent:
            return forward(*args, **kwargs) if kwargs else tangents.dual_call(args)
        out = compiled_forward(*args, **kwargs)
        if tangents.wanted and not kwargs:
            tangents.plain_call_seen(args)
        return out

    run.block_jvp = tangents  # what the tests inspect: compiled graphs and pending signatures
    return run


def apply_compile(model: nn.Module, backend: str = "inductor", allow_eager_tangent: bool = False) -> nn.Module:
    """torch.compile(fullgraph=True) each block's forward (its module hooks, e.g. FSDP's, stay eager);
    calls carrying forward-mode tangents run the block's compiled JVP graph (`_compiled_block`), one
    graph per signature for all identical blocks."""
    shared = JVPGraphs()
    for block in model.blocks:
        block.forward = _compiled_block(block, block.forward, backend, allow_eager_tangent, shared)
    return model


def parallelize(model: nn.Module, meshes: Meshes, cfg: ParallelConfig) -> nn.Module:
    """CP (if the CP group has several ranks), AC, compile, FSDP2 -- in this order -- on `model`, in place."""
    if meshes.cp.size() > 1:
        apply_cp(model, meshes.cp.get_group())
    apply_ac(model, cfg.ac)
    if cfg.compile:
        apply_compile(model, allow_eager_tangent=cfg.allow_eager_tangent)
    return apply_fsdp(model, meshes.fsdp, cfg.param_dtype, cfg.reduce_dtype, cfg.reshard_after_forward)
