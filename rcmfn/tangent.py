"""The sCM tangent: cos t sin t dF_theta-/dt along the teacher's probability-flow ODE.

SPEC-rcm §2.4-2.5. The student's F is differentiated with `torch.func.jvp` over the whole network
(no hand-written per-layer tangents); the pass runs without autograd history and both outputs are
detached, because the tangent is a target, never differentiated (known trap: `torch.no_grad()` does
not stop forward-mode tangents, so the detach is explicit).
"""

from typing import Literal

import torch

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
    torch.func.jvp; sharded students pass a dual-number jvp instead (parallel/fsdp.py says why).
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
