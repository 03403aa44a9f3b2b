"""Wan DiTs (Wan2.1 T2V 1.3B, 14B; Wan2.2 TI2V-5B): model, configs and checkpoint key maps. SPEC-models §3."""

from rcmfn.models.wan.configs import WAN22_TI2V_5B, WAN22_TINY, WAN_1_3B, WAN_14B, WAN_TINY, WanConfig
from rcmfn.models.wan.keys import diffusers_key_map, key_maps, official_key_map
from rcmfn.models.wan.model import WanBlock, WanModel, velocity_net

__all__ = [
    "WAN22_TI2V_5B",
    "WAN22_TINY",
    "WAN_14B",
    "WAN_1_3B",
    "WAN_TINY",
    "WanBlock",
    "WanConfig",
    "WanModel",
    "diffusers_key_map",
    "key_maps",
    "official_key_map",
    "velocity_net",
]
