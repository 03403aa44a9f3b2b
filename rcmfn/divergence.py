"""Divergence is caught, not hidden: gradient health before the optimiser step, finite weights before saves.

The official trainer passes every gradient through nan_to_num and always steps (SPEC-rcm §4.3,
`force_finite`); with NaN losses masked to zero (§2.8, §3.7) a diverged run then logs zero losses and
trains on, counters, warm-up, EMA and weight decay advancing on zero gradients. rcmfn instead measures
the raw gradient (global 2-norm in float64, so finite gradients never overflow it), skips the step when
it is not finite, and stops with `DivergenceError` after `LoopConfig.max_bad_steps` consecutive skipped
or fully masked steps of one network.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


class DivergenceError(RuntimeError):
    """Training stopped: a network's gradients, losses or weights stopped being finite."""


def _full(x: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) reduction's value on every rank; a plain tensor as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


@dataclass(frozen=True)
class GradientHealth:
    """The raw gradients of one optimiser step, before anything cleans them."""

    norm: float
    """Global 2-norm, accumulated in float64 (inf or nan when any entry is)."""
    nonfinite: int
    """Number of non-finite gradient entries (counted only when the norm is not finite)."""

    @property
    def finite(self) -> bool:
        return self.norm == self.norm and self.norm != float("inf")


def gradient_health(grads: Iterable[torch.Tensor]) -> GradientHealth:
    """Norm and non-finite count of `grads` (plain or DTensor; sharded values are reduced over their mesh)."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return GradientHealth(0.0, 0)
    # one multi-tensor norm (plain tensors and DTensors alike), then the norm of the per-tensor norms
    norms = [_full(n) for n in torch._foreach_norm(grads, 2, dtype=torch.float64)]
    norm = float(torch.linalg.vector_norm(torch.stack([n.reshape(()).to(norms[0].device) for n in norms])))
    if norm == norm and norm != float("inf"):
        return GradientHealth(norm, 0)
    nonfinite = sum(int(_full((~torch.isfinite(g)).sum())) for g in grads)
    return GradientHealth(norm, nonfinite)


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a non-finite entry (sharded ones checked over every rank)."""
    return [name for name, t in tensors.items() if not bool(_full(torch.isfinite(t.detach()).all()))]


def check_finite_weights(networks: Mapping[str, Mapping[str, torch.Tensor] | None], what: str) -> None:
    """Raise DivergenceError before `what` (a checkpoint, an export) would store non-finite weights."""
    for network, tensors in networks.items():
        if tensors is None:
            continue
        flat = dict(tensors.items(include_nested=True, leaves_only=True)) if hasattr(tensors, "batch_size") else tensors
        if bad := nonfinite_tensors(flat):
            shown = ", ".join(str(b) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DivergenceError(f"not writing {what}: the {network} weights are not finite ({shown})")


def health_metrics(health: GradientHealth) -> dict:
    """The metrics of one step's gradient health (grad_norm is the raw norm, before anything cleans it)."""
    return {"grad_norm": health.norm, "grad_nonfinite": health.nonfinite, "step_skipped": not health.finite}


def count_bad_step(
    bad_steps: dict[str, int], network: str, metrics: dict, batch: int, iteration: int, max_bad_steps: int
) -> None:
    """Advance or reset `network`'s run of bad steps in `bad_steps` (skipped, or a loss whose every sample
    was masked); raise DivergenceError naming the network, the iteration and what was not finite when the
    run reaches `max_bad_steps`."""
    masked = [k.removesuffix("_masked") for k, v in metrics.items() if k.endswith("_masked") and v >= batch]
    if not metrics["step_skipped"] and not masked:
        bad_steps[network] = 0
        return
    run = bad_steps[network] = bad_steps.get(network, 0) + 1
    if run < max_bad_steps:
        return
    what = []
    if metrics["step_skipped"]:
        what.append(f"gradient norm {metrics['grad_norm']} ({metrics['grad_nonfinite']} non-finite gradient entries)")
    what += [f"all {batch} samples of the {loss} loss non-finite (masked)" for loss in masked]
    raise DivergenceError(
        f"the {network} diverged: {run} consecutive bad steps up to iteration {iteration}; last: "
        f"{'; '.join(what)}. Lower the learning rate or check the data; max_bad_steps = {max_bad_steps}"
    )
