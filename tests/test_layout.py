"""Mechanical layout rules from STYLE.md: import boundaries, no prints in library code, size budgets."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LIBRARY = sorted(p for d in ("rcmfn", "ops", "parallel") for p in (ROOT / d).rglob("*.py"))
MATH = sorted(p for p in (ROOT / "rcmfn").rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MATH, ids=lambda p: str(p.relative_to(ROOT)))
def test_rcmfn_imports_neither_parallel_nor_torch_distributed(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] == "parallel" or m.startswith("torch.distributed")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_code_does_not_print(path):
    calls = [
        n.lineno
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
    ]
    assert not calls, f"{path.relative_to(ROOT)} calls print() at lines {calls}"


def test_no_autograd_function_with_jvp_in_ops():
    # pytorch#192985: Dynamo drops autograd.Function.jvp inside torch.func.jvp; ops use forward-AD rules.
    for path in (ROOT / "ops").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
                assert "jvp" not in methods, f"{path.name}: class {node.name} defines jvp"


BUDGETS = {"rcmfn/models": 400, "rcmfn/toy": 400, "ops": 600, "rcmfn": 250, "entrypoints": 250}


@pytest.mark.parametrize(
    "path", LIBRARY + sorted((ROOT / "entrypoints").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_files_stay_within_their_size_budget_or_say_why(path):
    rel = str(path.relative_to(ROOT))
    budget = next((b for prefix, b in BUDGETS.items() if rel.startswith(prefix)), None)
    text = path.read_text()
    if budget is None or "size budget:" in text:  # a file over budget carries a comment saying why
        return
    assert len(text.splitlines()) <= budget, f"{rel} has {len(text.splitlines())} lines (budget {budget})"
