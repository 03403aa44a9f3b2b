"""The one place rcmfn calls the compiler: `compiled(fn)` and the inductor settings every graph gets.

Why one place: inductor's mix-order reduction (default on since torch 2.10, GPU only) fuses a row
reduction and a column reduction over the same tensor, e.g. a LayerNorm backward with the sum over tokens
that gives the gradient of a broadcast modulation vector. When those column sums are slices of one
buffer (the backward of `chunk` into shift / scale / gate is a `cat`), its final reduce rebinds the
slices to fresh tensors and never writes the buffer: the gradients of every adaLN modulation, the time
MLP and everything upstream are uninitialised memory (pytorch#193061, fix pytorch#193103; not in torch
2.11 - 2.13). Measured on one H200, torch 2.11, a Cosmos 2B block at 4,096 tokens: compiled modulation
gradients inf in bf16 and 70-260 % off in float32, exact with the fusion off; the whole 2B net's
`--compile` iteration gave an infinite gradient norm from step 0 (found with the diagnostic
scripts compile_block_check.py and compile_grad_check.py, in scripts/ at commit b50e6aa). The CPU
backend has no such fusion, so the tiny CPU runs never saw it.
"""

from collections.abc import Callable

import torch

# Inductor settings for every graph rcmfn compiles; keys this torch does not know are left out.
INDUCTOR_OPTIONS: dict[str, object] = {"triton.mix_order_reduction": False}


def inductor_options() -> dict[str, object]:
    """INDUCTOR_OPTIONS restricted to the installed inductor's settings (a later torch may drop the key)."""
    from torch._inductor import config

    known = config.get_config_copy()
    return {k: v for k, v in INDUCTOR_OPTIONS.items() if k in known}


def compiled(fn: Callable, backend: str = "inductor", fullgraph: bool = True) -> Callable:
    """torch.compile(fn, fullgraph) with rcmfn's inductor settings (other backends take no options)."""
    options = inductor_options() if backend == "inductor" else None
    return torch.compile(fn, fullgraph=fullgraph, backend=backend, options=options)


def compile_graph(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """inductor's compile_fx of an aten graph (parallel/block_jvp.py) with rcmfn's inductor settings."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, example_inputs, config_patches=inductor_options())
