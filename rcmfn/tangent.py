"""The sCM tangent: cos t sin t dF_theta-/dt along the teacher's probability-flow ODE.

SPEC-rcm §2.4-2.5. The student's F is differentiated with `torch.func.jvp` over the whole network
(no hand-written per-layer tangents); the pass runs without autograd history and both outputs are
detached, because the tangent is a target, never differentiated (known trap: `torch.no_grad()` does
not stop forward-mode tangents, so the detach is explicit).

Two JVP backends compute the same derivative (`scm_tangent`'s `jvp_fn`):
- `torch.func.jvp` (functorch): for networks called as pure functions (`functional_call` over a
  TensorDict of parameters), the single-process trainers and the toy; it can be `torch.compile`d whole.
- `dual_jvp` (forward-mode dual numbers, `torch.autograd.forward_ad`): for networks called as modules
  whose hooks cannot run inside functorch's transforms, i.e. FSDP2-sharded ones (its all-gather
  allocates inside the transform; parallel/sharded_training.py, pytorch#182641). Every op's forward-AD
  formula is the one torch.func.jvp uses; the attention op and the CP collectives carry tangents
  through their Autograd kernels; compiled blocks run their JVP graphs (parallel/block_jvp.py).
Both are exact to rounding (tests/parallel/test_fsdp_cp.py: sharded dual tangent == torch.func.jvp).
"""

from collections.abc import Callable
from typing import Literal

import torch
from torch.autograd import forward_ad

from rcmfn.precond import Denoiser, batch_view
from rcmfn.time import check_trig_time

TangentMethod = Literal["jvp", "semi_fd", "fd"]


def _fd_time_derivative(F_at_t, F_at_t_minus_h, h: float) -> torch.Tensor:
    """(cos h F(t) - F(t - h)) / sin h: the finite difference the official code uses. SPEC-rcm §2.5."""
    return (torch.cos(torch.tensor(h, dtype=torch.float64)) * F_at_t.double() - F_at_t_minus_h.double()) / (
        torch.sin(torch.tensor(h, dtype=torch.float64))
    )


def scm_tangent(
    denoise: Denoiser,
    params,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    teacher_velocity: torch.Tensor,
    method: TangentMethod = "jvp",
    fd_step: float = 1e-4,
    jvp_fn=torch.func.jvp,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (F_theta-(x_t, t), T) with T = cos t sin t dF/dt along dx/dt = F_teacher, both detached.

    SPEC-rcm §2.4-2.5. `method`:
      "jvp"      full forward-mode derivative, x tangent cos t sin t F_T and time tangent cos t sin t;
      "semi_fd"  jvp in x only, plus a finite difference in t with step `fd_step`;
      "fd"       no jvp: one exact TrigFlow step of size h along F_T, then a finite difference.
    t is a float64 [B] tensor in (0, pi/2). `jvp_fn(fn, primals, tangents) -> (out, tangent)` is
    torch.func.jvp; sharded students pass `dual_jvp` (the module docstring says why).
    """
    if not torch.compiler.is_compiling():
        check_trig_time(t, "t")
    if teacher_velocity.shape != x_t.shape:
        raise ValueError(
            f"teacher velocity shape {tuple(teacher_velocity.shape)} must equal x_t shape {tuple(x_t.shape)}"
        )
    t = t.double()
    cos_sin = torch.cos(t) * torch.sin(t)
    x_tangent = (batch_view(cos_sin, x_t) * teacher_velocity.double()).to(x_t.dtype)

    with torch.no_grad():
        if method == "fd":
            F = denoise(params, x_t, t, cond)
            x_prev = (
                torch.cos(torch.tensor(fd_step, dtype=torch.float64)) * x_t.double()
                - torch.sin(torch.tensor(fd_step, dtype=torch.float64)) * teacher_velocity.double()
            ).to(x_t.dtype)
            F_prev = denoise(params, x_prev, t - fd_step, cond)
            tangent = batch_view(cos_sin, x_t) * _fd_time_derivative(F, F_prev, fd_step)
            return F.detach(), tangent.to(F.dtype).detach()

        def student_velocity(x, time):
            return denoise(params, x, time, cond)

        time_tangent = cos_sin if method == "jvp" else torch.zeros_like(t)
        if method not in ("jvp", "semi_fd"):
            raise ValueError(f"unknown tangent method {method!r}; expected 'jvp', 'semi_fd' or 'fd'")
        F, tangent = jvp_fn(student_velocity, (x_t, t), (x_tangent, time_tangent))
        if method == "semi_fd":
            F_prev = denoise(params, x_t, t - fd_step, cond)
            tangent = tangent.double() + batch_view(cos_sin, x_t) * _fd_time_derivative(F, F_prev, fd_step)
        return F.detach(), tangent.to(F.dtype).detach()


def dual_jvp(fn: Callable, primals: tuple, tangents: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), directional derivative along `tangents`) with forward-mode dual tensors.

    The contract of torch.func.jvp for one tensor output, without functorch's wrappers (the module
    docstring says when that matters).
    """
    with forward_ad.dual_level():
        out = fn(*(forward_ad.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
        primal, tangent = forward_ad.unpack_dual(out)
        tangent = torch.zeros_like(primal) if tangent is None else tangent
    return primal, tangent
