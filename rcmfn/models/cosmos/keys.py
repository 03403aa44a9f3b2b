"""Checkpoint layouts of the Cosmos-Predict2 DiT as data: official <-> ours <-> diffusers.

SPEC-models §2.7. Every tensor maps 1:1 (no reshape, no transpose); Text2Image and Video2World
share the names (only the patch-embed width differs, 68 vs 72). Use with
`rcmfn.models.checkpoint.load_into_meta_module` / `export_checkpoint`.
"""

import re

from rcmfn.models.checkpoint import IDENTITY, KeyMap

# (official without its `net.` prefix, ours, diffusers `CosmosTransformer3DModel`)
GLOBAL_KEYS: tuple[tuple[str, str, str], ...] = (
    ("x_embedder.proj.1.weight", "x_embedder.weight", "patch_embed.proj.weight"),
    ("t_embedder.1.linear_1.weight", "t_embedder.linear_1.weight", "time_embed.t_embedder.linear_1.weight"),
    ("t_embedder.1.linear_2.weight", "t_embedder.linear_2.weight", "time_embed.t_embedder.linear_2.weight"),
    ("t_embedding_norm.weight", "t_embedding_norm.weight", "time_embed.norm.weight"),
    (
        "final_layer.adaln_modulation.1.weight",
        "final_layer.adaln_modulation.down.weight",
        "norm_out.linear_1.weight",
    ),
    (
        "final_layer.adaln_modulation.2.weight",
        "final_layer.adaln_modulation.up.weight",
        "norm_out.linear_2.weight",
    ),
    ("final_layer.linear.weight", "final_layer.linear.weight", "proj_out.weight"),
)

# Per block, relative to the block prefixes in BLOCK_PREFIXES; 20 tensors.
BLOCK_KEYS: tuple[tuple[str, str, str], ...] = (
    *(
        (f"{attn}.{proj}.weight", f"{attn}.{proj}.weight", f"{dattn}.{dproj}.weight")
        for attn, dattn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for proj, dproj in (
            ("q_proj", "to_q"),
            ("k_proj", "to_k"),
            ("v_proj", "to_v"),
            ("output_proj", "to_out.0"),
            ("q_norm", "norm_q"),
            ("k_norm", "norm_k"),
        )
    ),
    *(
        (
            f"adaln_modulation_{part}.{idx}.weight",
            f"adaln_modulation_{part}.{ours}.weight",
            f"{norm}.linear_{idx}.weight",
        )
        for part, norm in (("self_attn", "norm1"), ("cross_attn", "norm2"), ("mlp", "norm3"))
        for idx, ours in ((1, "down"), (2, "up"))
    ),
    ("mlp.layer1.weight", "mlp.layer1.weight", "ff.net.0.proj.weight"),
    ("mlp.layer2.weight", "mlp.layer2.weight", "ff.net.2.weight"),
)

OFFICIAL, OURS, DIFFUSERS = 0, 1, 2
BLOCK_PREFIXES = ("blocks", "blocks", "transformer_blocks")

# Official keys (after the prefix) that carry no learnable state and are dropped on load: RoPE
# buffers, training counters, Transformer Engine state. SPEC-models §2.7.
OFFICIAL_JUNK = re.compile(r"pos_embedder\.(seq|dim_spatial_range|dim_temporal_range)|accum_\w+|.*\._extra_state")
OFFICIAL_PREFIXES = ("net.", "net_ema.")

_BLOCK_RE = [re.compile(rf"{prefix}\.(\d+)\.(.+)") for prefix in BLOCK_PREFIXES]
_GLOBAL = {(src, dst): {row[src]: row[dst] for row in GLOBAL_KEYS} for src in range(3) for dst in range(3)}
_BLOCK = {(src, dst): {row[src]: row[dst] for row in BLOCK_KEYS} for src in range(3) for dst in range(3)}


def translate(key: str, src: int, dst: int) -> str | None:
    """The name of `key` (layout `src`) in layout `dst` (OFFICIAL without prefix, OURS, DIFFUSERS),
    or None when it is not a Cosmos-Predict2 tensor name."""
    if key in _GLOBAL[src, dst]:
        return _GLOBAL[src, dst][key]
    match = _BLOCK_RE[src].fullmatch(key)
    if match and match.group(2) in _BLOCK[src, dst]:
        return f"{BLOCK_PREFIXES[dst]}.{match.group(1)}.{_BLOCK[src, dst][match.group(2)]}"
    return None


def _known(translated: str | None, key: str) -> str:
    if translated is None:
        raise KeyError(f"{key!r} is not a Cosmos-Predict2 tensor name in this layout")
    return translated


def official_key_map(prefix: str = "net.") -> KeyMap:
    """Official `model*.pt` layout. SPEC-models §2.7.

    `prefix` picks the copy: "net." (default) or "net_ema." (training checkpoints hold both; the
    other copy is dropped). Junk keys are dropped; unknown keys raise KeyError (the loader lists
    them as unexpected, so a file in another layout never matches one of our names by accident).
    """
    if prefix not in OFFICIAL_PREFIXES:
        raise ValueError(f"official prefix must be one of {OFFICIAL_PREFIXES}; got {prefix!r}")
    others = tuple(p for p in OFFICIAL_PREFIXES if p != prefix)

    def to_ours(key: str) -> str | None:
        if key.startswith(others):
            return None
        if not key.startswith(prefix):
            raise KeyError(key)
        rest = key[len(prefix) :]
        if OFFICIAL_JUNK.fullmatch(rest):
            return None
        return _known(translate(rest, OFFICIAL, OURS), key)

    def from_ours(name: str) -> str:
        return prefix + _known(translate(name, OURS, OFFICIAL), name)

    return KeyMap(to_ours=to_ours, from_ours=from_ours)


def diffusers_key_map() -> KeyMap:
    """diffusers `CosmosTransformer3DModel` (`transformer/` folder) layout. SPEC-models §2.7."""

    return KeyMap(
        to_ours=lambda key: _known(translate(key, DIFFUSERS, OURS), key),
        from_ours=lambda name: _known(translate(name, OURS, DIFFUSERS), name),
    )


OURS_KEY_MAP = IDENTITY
"""Our own names (`CosmosDiT.state_dict()` keys), e.g. for safetensors written by rcmfn itself."""

KEY_MAPS: dict[str, KeyMap] = {
    "official": official_key_map(),
    "official-ema": official_key_map("net_ema."),
    "diffusers": diffusers_key_map(),
    "ours": OURS_KEY_MAP,
}
