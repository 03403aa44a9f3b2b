"""Power-function EMA (EDM2) of the student's parameters, on TensorDicts.

SPEC-rcm §7: gamma is the largest real root of x^3 + 7x^2 + (16 - s^-2)x + (12 - s^-2) for relative
std s, and beta(n) = (1 - 1/(n + 1))^(gamma + 1), 0 for n < 1 (the first update copies).
"""

import numpy as np
import torch
from tensordict import TensorDict


def ema_exponent(rate: float) -> float:
    """gamma(s): largest real root of the EDM2 cubic. SPEC-rcm §7 (s = 0.1 -> 6.937)."""
    if not 0 < rate < 0.2887:  # s^-2 must exceed 12 for a positive root (also rejects nan)
        raise ValueError(f"EMA rate (relative std) must lie in (0, 0.2887); got {rate}")
    inv_sq = rate**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv_sq, 12.0 - inv_sq])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_beta(n: int, rate: float, iteration_shift: int = 0) -> float:
    """beta(n) = (1 - 1/(n + 1))^(gamma + 1) at n = i_eff + shift; 0 for n < 1. SPEC-rcm §7."""
    n = n + iteration_shift
    if n < 1:
        return 0.0
    return (1.0 - 1.0 / (n + 1)) ** (ema_exponent(rate) + 1.0)


@torch.no_grad()
def ema_update(ema: TensorDict, params: TensorDict, beta: float) -> TensorDict:
    """ema <- beta ema + (1 - beta) params, in place on `ema` (kept in its own dtype, float32), returned.

    The contract is inputs -> output; the in-place lerp avoids a second copy of the weights.
    """
    targets = dict(ema.items(include_nested=True, leaves_only=True))
    sources = [params.get(key).detach().to(value.dtype) for key, value in targets.items()]
    # one multi-tensor op, not one lerp per tensor (per-op overhead dominates small nets on the CPU)
    torch._foreach_lerp_(list(targets.values()), sources, 1.0 - beta)
    return ema
