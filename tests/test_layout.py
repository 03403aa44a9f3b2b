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


def _entrypoint_module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_entrypoints_import_each_other_without_a_cycle():
    """Configs live in entrypoints/config.py so that the runners never import the CLI module back."""
    modules = {_entrypoint_module(p): p for p in (ROOT / "entrypoints").rglob("*.py")}
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}
    assert graph["entrypoints.distill"] >= {"entrypoints.config", "entrypoints.toy_run", "entrypoints.distributed"}
    done, active = set(), []

    def visit(name):
        if name in active:
            raise AssertionError("import cycle: " + " -> ".join([*active[active.index(name) :], name]))
        if name in done:
            return
        active.append(name)
        for dep in graph[name]:
            visit(dep)
        active.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_one_main_per_command():
    """Each `python -m` command has one entry; the sharded runner is reached through entrypoints.distill."""
    assert '__name__ == "__main__"' not in (ROOT / "entrypoints" / "distributed.py").read_text()
