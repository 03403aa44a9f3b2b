"""Cosmos-Predict2 DiT (MiniTrainDIT): configs, the pure-function model, checkpoint key maps.

SPEC-models §2. `build_cosmos(config)` on meta, then `load_into_meta_module(model, path,
official_key_map())`; call through `torch.func.functional_call`.
"""

from rcmfn.models.cosmos.configs import (
    CONFIGS,
    COSMOS_2B_T2I,
    COSMOS_2B_V2W,
    COSMOS_14B_T2I,
    COSMOS_14B_V2W,
    TIMESTEP_SCALE,
    CosmosConfig,
)
from rcmfn.models.cosmos.keys import KEY_MAPS, diffusers_key_map, official_key_map
from rcmfn.models.cosmos.model import CosmosDiT, build_cosmos, init_random_, random_cosmos, velocity_net

__all__ = [
    "CONFIGS",
    "COSMOS_2B_T2I",
    "COSMOS_2B_V2W",
    "COSMOS_14B_T2I",
    "COSMOS_14B_V2W",
    "TIMESTEP_SCALE",
    "CosmosConfig",
    "KEY_MAPS",
    "CosmosDiT",
    "build_cosmos",
    "diffusers_key_map",
    "init_random_",
    "official_key_map",
    "random_cosmos",
    "velocity_net",
]
