"""Fixtures for the ops tests: which fused-kernel paths run here.

The path is chosen per call by the op's explicit `impl` argument ("reference" or "triton"), never by
a global. Without CUDA the Triton kernel runs under Triton's interpreter on CPU tensors, which triton
only provides when TRITON_INTERPRET=1 is set before `triton.language` is first imported (it decides
at import time whether its own library functions are interpreted). In a plain `pytest` run some
other import (tensordict, through torch) has usually loaded triton by the time this file is read;
then the `impl="triton"` tests skip here and `test_triton_kernel_under_interpreter` reruns them in a
child process started with TRITON_INTERPRET=1. Run `TRITON_INTERPRET=1 pytest tests/ops` to run them
in-process.
"""

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


if not ON_GPU and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

TRITON = _triton_importable()


def interpreter_ready() -> bool:
    """True when triton was imported in interpreter mode, so kernels run on CPU tensors."""
    if ON_GPU or not TRITON:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


TRITON_RUNS_HERE = TRITON and (ON_GPU or interpreter_ready())


def interpreter_defect() -> str:
    """Why this Triton's interpreter cannot run the kernel here ("" if it can). Seen with triton 3.6 and
    numpy 2.4: the interpreter turns a runtime loop bound into a Python int with int() of a one-element
    array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted"); triton 3.9 squeezes
    the array first. GPU runs compile the kernel and are not affected."""
    if not TRITON:
        return ""
    import numpy
    import triton

    old_triton = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9)
    strict_numpy = tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4)
    if old_triton and strict_numpy:
        return f"triton {triton.__version__}'s interpreter fails on numpy {numpy.__version__} (int() of an array)"
    return ""


@pytest.fixture(params=["reference", "triton"], scope="session")
def impl(request):
    """The `impl` argument of ops.attention under test; "triton" skips where it cannot run."""
    if request.param == "triton" and not TRITON_RUNS_HERE:
        pytest.skip("the Triton kernel runs in the child process of test_triton_kernel_under_interpreter")
    return request.param


@pytest.fixture(autouse=True)
def few_kernel_configs(request, monkeypatch):
    """On CUDA, the Triton autotuner tries two configurations instead of the full search space.

    Every new (length bucket, head dim, dtype, K/V tangent) key compiles and times each configuration;
    across the suite's random shapes the full space compiled for over ten minutes. The production
    configuration (the first of the search space) and the fallback that fits every dtype and head dim
    stay; tests marked `full_autotune` (the model-size ones) keep the whole space.
    """
    if not (ON_GPU and TRITON) or request.node.get_closest_marker("full_autotune"):
        return
    from ops.attention import kernel

    tuned = kernel._attention_fwd_jvp_tuned
    kept = [kernel.TUNING_SPACE[0], kernel.FALLBACK_CONFIG]
    configs = [
        cfg
        for cfg in tuned.configs
        if (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages) in kept
    ]
    assert len(configs) == len(kept), "the kept configurations are no longer in the search space"
    monkeypatch.setattr(tuned, "configs", configs)
