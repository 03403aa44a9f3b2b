"""The README's first lines are the two set-up-and-run commands, and its loop example runs."""

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert text.index("```bash") < 20
    assert len(block) == 2
    assert "python -m entrypoints.distill" in block[0] and "pytest" in block[1]


def test_compose_your_own_loop_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    samples = scope["samples"]
    assert samples.shape == (8, *scope["mixture"].shape) and torch.isfinite(samples).all()
    assert torch.isfinite(scope["loss"]) and scope["loss"] > 0
