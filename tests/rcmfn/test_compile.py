"""rcmfn.compile: every graph the project compiles gets the inductor settings that keep gradients exact.

The failure it guards (mix-order reduction writing no gradient for chunked modulation vectors,
pytorch#193061) happens only in inductor's GPU code, so the CPU tests check the plumbing: no module
calls the compiler except through rcmfn.compile, and what it passes is accepted by this torch. The
numbers are checked at real width on the GPU (tests/parallel/test_compile_iteration_gpu.py).
"""

import ast
from pathlib import Path

import torch

import rcmfn.compile as rc

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rcmfn", "parallel", "ops", "entrypoints")


def _compiler_calls(path: Path) -> list[str]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("torch.compile", "compile_fx") or name.endswith("compile_fx.compile_fx"):
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return calls


def test_every_compiler_call_goes_through_rcmfn_compile():
    own = ROOT / "rcmfn" / "compile.py"
    calls = [c for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if p != own for c in _compiler_calls(p)]
    assert not calls, f"call the compiler through rcmfn.compile (compiled / compile_graph), not directly: {calls}"
    assert len(_compiler_calls(own)) == 2  # the scan itself sees calls


def test_compiled_passes_the_settings(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    rc.compiled(abs)
    assert seen["options"] == {"triton.mix_order_reduction": False} and seen["fullgraph"] is True
    rc.compiled(abs, backend="aot_eager")
    assert seen["options"] is None and seen["backend"] == "aot_eager"


def test_compile_graph_passes_the_settings(monkeypatch):
    import torch._inductor.compile_fx as cfx

    seen = {}
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, ex, config_patches=None: seen.update(patches=config_patches))
    rc.compile_graph(None, [])
    assert seen["patches"] == {"triton.mix_order_reduction": False}


def test_unknown_settings_are_left_out(monkeypatch):
    monkeypatch.setattr(rc, "INDUCTOR_OPTIONS", {**rc.INDUCTOR_OPTIONS, "no.such_setting": 1})
    assert rc.inductor_options() == {"triton.mix_order_reduction": False}


def test_this_torch_accepts_the_settings():
    """Inductor checks options only when it compiles: compile something small for real."""
    x = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64).reshape(4, 6).requires_grad_(True)
    scale = torch.linspace(0.5, 1.5, 6, dtype=torch.float64).requires_grad_(True)

    def f(x, scale):  # a row and a column reduction over one tensor: the pattern at fault on the GPU
        return (torch.nn.functional.layer_norm(x, (6,)) * (1 + scale)).square().sum()

    want = torch.autograd.grad(f(x, scale), (x, scale))
    got = torch.autograd.grad(rc.compiled(f)(x, scale), (x, scale))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
