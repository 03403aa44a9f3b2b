"""The networks rcmfn distils, as a flat table of typed specs looked up by exact name.

STYLE example 15 (presets as typed instances), 17 (key maps as data); SPEC-models §3, §4.
"""

import dataclasses
import fnmatch
import os

import torch
from torch import nn

from rcmfn.models.checkpoint import FP32_PATTERNS_ATTR, LoadReport, load_into_meta_module
from rcmfn.models.cosmos.configs import COSMOS_2B_T2I, COSMOS_2B_V2W, COSMOS_14B_T2I, COSMOS_14B_V2W, TINY_T2I
from rcmfn.models.cosmos.family import COSMOS
from rcmfn.models.family import Family, ModelSpec
from rcmfn.models.wan.configs import (
    WAN22_T2V_A14B,
    WAN22_T2V_A14B_SWITCH,
    WAN22_TI2V_5B,
    WAN22_TINY,
    WAN_1_3B,
    WAN_14B,
    WAN_I2V_14B,
    WAN_I2V_TINY,
    WAN_TINY,
)
from rcmfn.models.wan.family import WAN, WAN22_TI2V
from rcmfn.models.wan.i2v import WAN_I2V

__all__ = ["MODELS", "Family", "ModelSpec", "build_model", "cast_params", "get_spec", "random_model", "trainable_spec"]


# 480p training latents, 832 x 480 (SPEC-models §3.4): the official rCM runs train the 1.3B on 20 latent
# frames (77 pixel frames; `state_t=20` in NVlabs/rcm rcm/configs/experiments/rcm/wan2pt1_t2v.py:107) and
# the 14B on 21 (81 frames; `state_t=21`, same file :185). The official inference script defaults to 77
# frames for both sizes (rcm/inference/wan2pt1_t2v_rcm_infer.py:79); here each size samples at the frame
# count it trained on, 81 for the 14B as the paper's VBench runs (Table 2, 832 x 480 x 81).
WAN_1_3B_480P_LATENT = (16, 20, 60, 104)
WAN_14B_480P_LATENT = (16, 21, 60, 104)
# Cosmos-Predict2 (SPEC-models §2.5): text-to-image 1024 px 1:1 -> 16 x 1 x 128 x 128; Video2World
# 720p, 93 frames of 1280 x 704 -> 16 x 24 x 88 x 160 (needs a condition mask, see CosmosDiT).
# Wan2.1 I2V 14B, 81 frames (generate.py:84-85 default frame_num) -> 21 latent frames, at 832 x 480
# (60 x 104 latents) and 1280 x 720 (90 x 160); the official sizes of 'i2v-14B' (wan/configs/__init__.py
# SUPPORTED_SIZES). One network serves both: the two releases differ in weights only.
WAN_I2V_480P_LATENT = (16, 21, 60, 104)
WAN_I2V_720P_LATENT = (16, 21, 90, 160)
COSMOS_1024PX_LATENT = (16, 1, 128, 128)
COSMOS_720P_LATENT = (16, 24, 88, 160)
# Wan2.2 TI2V-5B at its release size, 121 frames of 1280 x 704 (wan/configs/wan_ti2v_5B.py:36,
# wan/configs/__init__.py SUPPORTED_SIZES 'ti2v-5B') through the Wan2.2 VAE (4, 16, 16): 48 x 31 x 44 x 80.
WAN22_720P_LATENT = (48, 31, 44, 80)
WAN22_VAE_STRIDE = (4, 16, 16)

MODELS: dict[str, ModelSpec] = {
    "wan1.3b": ModelSpec(WAN, WAN_1_3B, WAN_1_3B_480P_LATENT, 512, 4096),
    "wan14b": ModelSpec(WAN, WAN_14B, WAN_14B_480P_LATENT, 512, 4096),
    "wan-i2v-14b-480p": ModelSpec(WAN_I2V, WAN_I2V_14B, WAN_I2V_480P_LATENT, 512, 4096),
    "wan-i2v-14b-720p": ModelSpec(WAN_I2V, WAN_I2V_14B, WAN_I2V_720P_LATENT, 512, 4096),
    "cosmos2b": ModelSpec(COSMOS, COSMOS_2B_T2I, COSMOS_1024PX_LATENT, 512, 1024),
    "cosmos14b": ModelSpec(COSMOS, COSMOS_14B_T2I, COSMOS_1024PX_LATENT, 512, 1024),
    "cosmos2b-video": ModelSpec(COSMOS, COSMOS_2B_V2W, COSMOS_720P_LATENT, 512, 1024),
    "cosmos14b-video": ModelSpec(COSMOS, COSMOS_14B_V2W, COSMOS_720P_LATENT, 512, 1024),
    "wan2.2-ti2v-5b": ModelSpec(WAN22_TI2V, WAN22_TI2V_5B, WAN22_720P_LATENT, 512, 4096, WAN22_VAE_STRIDE),
    # Wan2.2 T2V A14B: two 14B experts switched at r = 0.875 (rcmfn/models/wan/configs.py), trained here at the
    # Wan2.1 14B rCM run's 480p 81-frame latent (the release samples 480p and 720p: Wan-Video/Wan2.2
    # wan/configs/__init__.py SUPPORTED_SIZES 't2v-A14B' lists 832*480 and 1280*720).
    "wan2.2-t2v-a14b": ModelSpec(WAN, WAN22_T2V_A14B, WAN_14B_480P_LATENT, 512, 4096, experts=WAN22_T2V_A14B_SWITCH),
    # Tiny random-weight nets of each family, for tests, benchmarks' CPU smoke runs and CPU distillation
    # runs: ordinary entries, so every code path treats them as the real ones.
    "wan-tiny": ModelSpec(WAN, WAN_TINY, (16, 3, 8, 12), 12, WAN_TINY.text_dim),
    "cosmos-tiny": ModelSpec(COSMOS, TINY_T2I, (16, 2, 8, 12), 12, TINY_T2I.text_dim),
    "wan2.2-tiny": ModelSpec(WAN22_TI2V, WAN22_TINY, (48, 2, 4, 6), 12, WAN22_TINY.text_dim, WAN22_VAE_STRIDE),
    "wan-i2v-tiny": ModelSpec(WAN_I2V, WAN_I2V_TINY, (16, 3, 8, 12), 12, WAN_I2V_TINY.text_dim),
    "wan2.2-a14b-tiny": ModelSpec(WAN, WAN_TINY, (16, 3, 8, 12), 12, WAN_TINY.text_dim, experts=WAN22_T2V_A14B_SWITCH),
}


def get_spec(name: str) -> ModelSpec:
    """The spec registered under exactly `name`; ValueError listing the valid names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {sorted(MODELS)}")
    return MODELS[name]


def unconditional_prompt(spec: ModelSpec, negative_prompt: str | None) -> str | None:
    """The prompt whose encoding is the teacher's unconditional input (CFG), or None for all zeros.

    SPEC-rcm §11.2. One rule for prepare (the shards' uncondition), distill (which reads it) and sample
    (the teacher rows). A given negative prompt is used as is, except that an empty one means zeros
    for a family whose uncondition is zeros: Cosmos-Predict2 learned "unconditional" as the text
    embedding times 0 (nvidia-cosmos/cosmos-predict2 cosmos_predict2/conditioner.py:126-134 and
    :573-579, with TextAttr dropout_rate 0.2 in configs/base/config_text2image.py:128-129) and its
    text2image pipeline uses that uncondition when the negative prompt is empty
    (pipelines/text2image.py:331, :371-374). Wan encodes its default negative prompt.
    """
    if negative_prompt is None or (negative_prompt == "" and spec.negative_prompt is None):
        return spec.negative_prompt
    return negative_prompt


def trainable_spec(spec: ModelSpec) -> ModelSpec:
    """The spec distillation builds the student and the fake score from: `spec` with the high-precision
    (float32) time path on wherever the architecture has that switch (CosmosConfig.high_precision_time).

    rCM paper §4.2 "High-Precision Time": the full-JVP tangent with every time-embedding layer in FP32
    (as Wan does), accepting an initial mismatch with the pretrained Cosmos network; SPEC-rcm §8.4. The
    teacher keeps `spec` itself, i.e. the released network's numerics (Cosmos: bf16 time path). Wan's
    time path is float32 in the release already (SPEC-models §3.4), so a Wan spec comes back unchanged.
    """
    if not any(f.name == "high_precision_time" for f in dataclasses.fields(spec.config)):
        return spec
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, high_precision_time=True))


def cast_params(module: nn.Module, dtype: torch.dtype, keep_fp32: bool = True) -> nn.Module:
    """Cast floating parameters/buffers to `dtype` in place, keeping the module's fp32_patterns fp32
    (the release's float32 tables, e.g. Wan's time MLP and modulation) unless `keep_fp32` is off."""
    keep = tuple(getattr(module, FP32_PATTERNS_ATTR, ())) if keep_fp32 else ()
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            fp32 = dtype.itemsize < 4 and any(fnmatch.fnmatchcase(name, p) for p in keep)
            tensor.data = tensor.data.to(torch.float32 if fp32 else dtype)
    return module


def build_model(
    spec: ModelSpec,
    checkpoint: str | os.PathLike | None = None,
    layout: str = "official",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    seed: int = 0,
    **options,
) -> tuple[nn.Module, LoadReport | None]:
    """Build `spec`'s network: from a checkpoint (streamed into a meta module) or randomly initialised.

    Returns (module, load report or None). `options` go to `spec.build` (e.g. sinusoid_dtype). With
    `strict` off, key problems do not raise: tensors the file lacks or mis-shapes get
    `initialise_fresh_` (drawn with `seed`), and the report's `initialised` names them.
    """
    if checkpoint is None:
        with torch.device(device):
            module = spec.build(spec.config, **options)
        return (cast_params(module, dtype) if dtype is not None else module), None
    if layout not in spec.key_maps:
        raise ValueError(f"unknown layout {layout!r} for {spec.family.name}; valid: {sorted(spec.key_maps)}")
    with torch.device("meta"):
        module = spec.build(spec.config, **options)
    fresh = None if strict else torch.Generator().manual_seed(seed)
    report = load_into_meta_module(module, checkpoint, spec.key_maps[layout], dtype, device, strict, fresh)
    return module, report


def random_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    """`spec`'s network with random weights on `device`, stored as `build_model` stores a release in
    `dtype` (float32 tables kept), drawn by the family's `random_init` from a generator seeded `seed`
    (and torch's global generator seeded `seed`, which Wan's own init draws from)."""
    torch.manual_seed(seed)
    module = build_model(spec, None, dtype=dtype, device=device)[0]
    return spec.random_init(module, torch.Generator(device=device).manual_seed(seed))
