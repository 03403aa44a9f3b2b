"""Checkpoint layouts of the Wan2.1 T2V and I2V DiTs as data: official <-> ours <-> diffusers.

SPEC-models §3.5. Our parameter names ARE the official ones (`WanModel` mirrors the release module
tree), so the official map only strips wrapper prefixes and drops junk; the diffusers map is the
table below. rCM training checkpoints are the official layout with a `net.` prefix and the patch
embedding stored as a Linear (D, 64) instead of a Conv3d (D, 16, 1, 2, 2): same numbers, reshaped.
"""

from rcmfn.models.checkpoint import IDENTITY, KeyMap
from rcmfn.models.wan.configs import WanConfig

# Prefixes stripped on load: ComfyUI repacks, rCM / imaginaire training checkpoints.
OFFICIAL_PREFIXES = ("model.diffusion_model.", "net.")
JUNK_SUFFIXES = ("._extra_state",)

# Module paths outside the blocks, official -> diffusers; each carries a weight and a bias.
GLOBAL_LINEARS = {
    "patch_embedding": "patch_embedding",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "head.head": "proj_out",
    # I2V image projection (official MLPProj `img_emb.proj` = LayerNorm, Linear, GELU, Linear, LayerNorm;
    # diffusers WanImageEmbedding norm1, ff, norm2). Absent from T2V nets, so T2V loads are unchanged.
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
# Module paths inside `blocks.{i}.`, official -> diffusers, with weight and bias.
BLOCK_LINEARS = {
    **{f"self_attn.{p}": f"attn1.{d}" for p, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"))},
    "self_attn.o": "attn1.to_out.0",
    **{f"cross_attn.{p}": f"attn2.{d}" for p, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"))},
    "cross_attn.o": "attn2.to_out.0",
    # I2V image keys/values (official WanI2VCrossAttention k_img, v_img; diffusers add_k_proj, add_v_proj).
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "norm3": "norm2",  # the affine cross-attention LayerNorm: official norm3 IS diffusers norm2
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# Single parameters (no bias), official -> diffusers.
GLOBAL_PARAMS = {"head.modulation": "scale_shift_table"}
BLOCK_PARAMS = {
    "modulation": "scale_shift_table",
    **{
        f"{a}.norm_{x}.weight": f"{b}.norm_{x}.weight"
        for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for x in "qk"
    },
    "cross_attn.norm_k_img.weight": "attn2.norm_added_k.weight",
}
# diffusers ignores this I2V key on load (transformer_wan.py `_keys_to_ignore_on_load_unexpected`); so do we.
DIFFUSERS_JUNK_SUFFIXES = (".attn2.norm_added_q.weight",)


def _with_leaves(table: dict[str, str]) -> dict[str, str]:
    return {f"{o}.{leaf}": f"{d}.{leaf}" for o, d in table.items() for leaf in ("weight", "bias")}


OFFICIAL_TO_DIFFUSERS_GLOBAL = {**_with_leaves(GLOBAL_LINEARS), **GLOBAL_PARAMS}
OFFICIAL_TO_DIFFUSERS_BLOCK = {**_with_leaves(BLOCK_LINEARS), **BLOCK_PARAMS}
DIFFUSERS_TO_OFFICIAL_GLOBAL = {d: o for o, d in OFFICIAL_TO_DIFFUSERS_GLOBAL.items()}
DIFFUSERS_TO_OFFICIAL_BLOCK = {d: o for o, d in OFFICIAL_TO_DIFFUSERS_BLOCK.items()}


def _rename(name: str, global_table: dict[str, str], block_table: dict[str, str]) -> str:
    """Rename through the tables; raises KeyError for a name the layout does not have."""
    if name.startswith("blocks."):
        _, index, local = name.split(".", 2)
        if not index.isdigit():
            raise KeyError(name)
        return f"blocks.{index}.{block_table[local]}"
    return global_table[name]


def official_to_ours(name: str) -> str | None:
    """Official (or ComfyUI / rCM-prefixed) key -> our name; None for junk that is dropped."""
    if name.endswith(JUNK_SUFFIXES):
        return None
    for prefix in OFFICIAL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def diffusers_to_ours(name: str) -> str | None:
    """diffusers `WanTransformer3DModel` key -> our (official) name; None for junk that is dropped."""
    if name.endswith(DIFFUSERS_JUNK_SUFFIXES):
        return None
    return _rename(name, DIFFUSERS_TO_OFFICIAL_GLOBAL, DIFFUSERS_TO_OFFICIAL_BLOCK)


def ours_to_diffusers(name: str) -> str:
    """Our (official) name -> diffusers key."""
    return _rename(name, OFFICIAL_TO_DIFFUSERS_GLOBAL, OFFICIAL_TO_DIFFUSERS_BLOCK)


def official_key_map(cfg: WanConfig) -> KeyMap:
    """The release layout (`diffusion_pytorch_model*.safetensors`); also reads rCM `.pth` files."""
    conv_shape = (cfg.dim, cfg.in_dim, *cfg.patch_size)

    def shape_to_ours(name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        # rCM stores the patch embedding as nn.Linear(in_dim * prod(patch) -> dim), flattened (c, kt, kh, kw).
        if name == "patch_embedding.weight" and len(shape) == 2:
            return conv_shape
        return None

    return KeyMap(to_ours=official_to_ours, from_ours=lambda name: name, shape_to_ours=shape_to_ours)


def diffusers_key_map(cfg: WanConfig) -> KeyMap:
    """The diffusers layout (`transformer/diffusion_pytorch_model*.safetensors` of -Diffusers repos)."""
    del cfg  # same for every size: no reshapes
    return KeyMap(to_ours=diffusers_to_ours, from_ours=ours_to_diffusers)


def key_maps(cfg: WanConfig) -> dict[str, KeyMap]:
    """Every layout by name: 'official' (also rCM), 'diffusers', and 'ours' (rcmfn's own names and shapes,
    as training checkpoints store them)."""
    return {"official": official_key_map(cfg), "diffusers": diffusers_key_map(cfg), "ours": IDENTITY}
