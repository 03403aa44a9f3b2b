"""FSDP2 over the student, the frozen teacher and the fake score: sharding and filling the networks.

SPEC-rcm §8.7 (FSDP2: one unit per block plus the root; reduce in float32). How the sharded networks
are called, and how the sCM tangent goes through them: parallel/sharded_training.py.
"""

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` with FSDP2: one unit per entry of `model.blocks`, then the root (embeddings, head).

    `param_dtype` is the compute dtype the parameters are all-gathered in (None: their stored dtype;
    bf16 over float32 storage gives float32 master weights and optimiser state); gradients are
    reduce-scattered in `reduce_dtype`. Forward inputs are not cast: the models choose their own
    precision per tensor (SPEC-models §3.4). The gradient reduction averages over the mesh, i.e. over
    data-parallel ranks (each rank's loss is a per-sample sum, as the official trainer) and over the
    ranks of a CP group (which all compute the same loss; parallel/context_parallel.py).
    `mesh` is 1-D (FSDP) or 2-D (replicate, shard) for HSDP.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def materialize(model: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """Allocate an FSDP-sharded model built on the meta device and fill it from rank 0's full weights.

    `full_state` is the complete state dict on rank 0 (CPU, any dtype: copied into each parameter's
    dtype) and {} elsewhere; each rank receives only its shards (StateDictOptions broadcast_from_rank0),
    so no rank but 0 ever holds a full copy. The models have no buffers (checked).
    """
    if list(model.buffers()):
        raise ValueError(f"{type(model).__name__} has buffers; materialize only fills parameters")
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, dict(full_state), options=options)  # it rewrites the dict it is given
    return model
