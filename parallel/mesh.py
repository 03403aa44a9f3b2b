"""The device meshes of a run: torchtitan's layout (axes dp_replicate, dp_shard, cp; FSDP over
dp_shard x cp, data over dp_replicate x dp_shard), built directly with `init_device_mesh` (parallelize.py
says why torchtitan's own builder is not used).
"""

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the data-parallel and context-parallel axes (torchtitan's names); product = world size."""

    world_size: int
    dp_replicate: int = 1
    """HSDP replicas (parameters replicated across them, sharded within)."""
    dp_shard: int = -1
    """FSDP shard degree for data; -1 = world_size / (dp_replicate * cp)."""
    cp: int = 1
    """Ulysses context-parallel degree: ranks sharing one sample's tokens (must divide the heads)."""

    def __post_init__(self):
        for name in ("world_size", "dp_replicate", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.dp_shard == -1:
            if self.world_size % (self.dp_replicate * self.cp):
                raise ValueError(
                    f"world size {self.world_size} is not divisible by dp_replicate {self.dp_replicate} x cp {self.cp}"
                )
            object.__setattr__(self, "dp_shard", self.world_size // (self.dp_replicate * self.cp))
        if self.dp_shard < 1 or self.dp_replicate * self.dp_shard * self.cp != self.world_size:
            raise ValueError(
                f"dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x cp {self.cp} must equal "
                f"the world size {self.world_size} (torchrun --nproc_per_node x nodes)"
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many distinct batches one step sees."""
        return self.dp_replicate * self.dp_shard

    def build_meshes(self, device_type: str) -> "Meshes":
        """The meshes of this layout over the default process group (ranks row-major in
        (dp_replicate, dp_shard, cp), so the ranks of one CP group are consecutive)."""
        world = init_device_mesh(
            device_type, (self.dp_replicate, self.dp_shard, self.cp), mesh_dim_names=("dp_replicate", "dp_shard", "cp")
        )
        if self.dp_replicate > 1:  # HSDP: replicate x (dp_shard cp), the same rank order as `world`
            fsdp = init_device_mesh(
                device_type,
                (self.dp_replicate, self.dp_shard * self.cp),
                mesh_dim_names=("dp_replicate", "dp_shard_cp"),
            )
        else:
            fsdp = world["dp_shard", "cp"]._flatten("dp_shard_cp")
        rank = world.get_rank()
        return Meshes(world=world, fsdp=fsdp, cp=world["cp"], dp_rank=rank // self.cp, dp_size=self.dp)


@dataclass(frozen=True)
class Meshes:
    """Device meshes of one run: FSDP over dp_shard x cp (2-D with dp_replicate for HSDP), the CP group,
    and this rank's data-parallel coordinate (which batch it reads; equal across a CP group)."""

    world: DeviceMesh
    fsdp: DeviceMesh
    cp: DeviceMesh
    dp_rank: int
    dp_size: int
