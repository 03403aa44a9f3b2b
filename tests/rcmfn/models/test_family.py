"""The model-family interface: one place knows a family, and the spec answers for it."""

import ast
import math
from pathlib import Path

import pytest

from rcmfn.models.registry import MODELS, get_spec

ROOT = Path(__file__).resolve().parents[3]
FAMILY_NAMES = {"wan", "cosmos"}
MODEL_CLASSES = {"WanModel", "CosmosDiT"}


def _family_branches(path: Path) -> list[str]:
    """Places in `path` that branch on a family: a comparison with a family name or a `.family` value,
    or an isinstance test against a family's model class."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = [o.value for o in operands if isinstance(o, ast.Constant) and o.value in FAMILY_NAMES]
            collections = [o for o in operands if isinstance(o, ast.Tuple | ast.List | ast.Set)]
            names += [
                e.value for c in collections for e in c.elts if isinstance(e, ast.Constant) and e.value in FAMILY_NAMES
            ]
            family_attr = any(
                isinstance(o, ast.Attribute) and o.attr in ("family", "name") and "family" in ast.unparse(o)
                for o in operands
            )
            if names or family_attr:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            if any(n in ast.unparse(node.args[1]) for n in MODEL_CLASSES):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_outside_rcmfn_models_branches_on_the_family():
    """Adding a family = one model folder + one registry entry: everything else asks the spec."""
    sources = [p for d in ("rcmfn", "entrypoints", "parallel", "ops", "scripts") for p in (ROOT / d).rglob("*.py")]
    outside = [p for p in sources if (ROOT / "rcmfn" / "models") not in p.parents]
    assert len(outside) > 40  # the scan sees the code base
    branches = [b for p in outside for b in _family_branches(p)]
    assert not branches, "family branches outside rcmfn/models/:\n" + "\n".join(branches)


def test_the_scan_finds_a_family_branch(tmp_path):
    """The check above is not vacuous: each form of branch it looks for is found."""
    probe = ROOT / "tests" / "rcmfn" / "models" / "_probe_family_branch.py"
    probe.write_text(
        'a = spec.family == "wan"\nb = spec.family.name in ("cosmos", "x")\nc = isinstance(m, WanModel)\nd = x == 1\n'
    )
    try:
        assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in _family_branches(probe)] == ["1", "2", "3"]
    finally:
        probe.unlink()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_spec_tokens_and_cp_tokens_follow_the_patch(name):
    spec = get_spec(name)
    pt, ph, pw = spec.family.patch(spec.config)
    _, T, H, W = spec.latent_shape
    assert spec.tokens() == (T // pt) * (H // ph) * (W // pw)
    cut = spec.cp_tokens(spec.latent_shape)
    assert cut == (spec.tokens() if spec.family.cp_axes == 3 else (H // ph) * (W // pw))
    assert spec.tokens() % cut == 0


@pytest.mark.parametrize("name", ["wan-tiny", "cosmos-tiny"])
def test_tiny_entries_are_ordinary_specs_of_their_family(name):
    tiny, full = get_spec(name), get_spec({"wan-tiny": "wan1.3b", "cosmos-tiny": "cosmos2b"}[name])
    assert tiny.family is full.family and tiny.key_maps.keys() == full.key_maps.keys()
    assert tiny.channels == full.channels and tiny.timestep_scale == full.timestep_scale
    assert tiny.with_blocks(1).depth == 1 and tiny.depth == 2
    linear, attention = tiny.flops()
    assert linear > 0 and attention > 0 and math.isfinite(linear + attention)
