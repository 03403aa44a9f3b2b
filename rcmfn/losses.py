"""Per-sample losses of rCM: sCM, DMD, fake score and discrete-time CM.

Every loss returns a float64 [B] tensor (the loop sums it, as the official trainer does, SPEC-rcm
§2.10) and zeroes a sample whose terms are not finite without touching the others (§2.8, §3.7). The
official code masks only the sCM and DMD losses; the fake-score and dCM losses are masked here too so
that one bad sample never turns a whole batch's gradient into NaN (the official code relies on
nan_to_num of the gradients for those; we do both).
"""

import torch

from rcmfn.precond import batch_view

TANGENT_NORM_EPS = 0.1  # g / (||g|| + 0.1), SPEC-rcm §2.9


def per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every axis but the first."""
    return x.flatten(1).sum(dim=1)


def nonfinite_samples(*tensors: torch.Tensor) -> torch.Tensor:
    """[B] bool mask: True where any of the tensors has a non-finite entry in that sample."""
    mask = torch.zeros(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for x in tensors:
        mask = mask | ~torch.isfinite(x.detach()).flatten(1).all(dim=1)
    return mask


def tangent_warmup_ratio(iteration: int, warmup_iterations: int) -> float:
    """rho = min(1, i / H), 1 when H = 0. SPEC-rcm §2.7."""
    if warmup_iterations <= 0:
        return 1.0
    return min(1.0, iteration / warmup_iterations)


def scm_target_direction(
    student_velocity: torch.Tensor,
    teacher_velocity: torch.Tensor,
    tangent: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    warmup_ratio: float = 1.0,
) -> torch.Tensor:
    """g = -cos t sqrt(1 - rho^2 sin^2 t)(F_sg - F_T) - (rho cos t sin t x_t + T), float64.

    SPEC-rcm §2.7 (rCM Algorithm 1). At rho = 1 this is cos t df/dt with f = cos t x_t - sin t F.
    """
    tb = batch_view(t.double(), x_t)
    cos, sin = torch.cos(tb), torch.sin(tb)
    rho = float(warmup_ratio)
    gap = student_velocity.detach().double() - teacher_velocity.double()
    return -cos * torch.sqrt(1.0 - rho**2 * sin**2) * gap - (rho * cos * sin * x_t.double() + tangent.double())


def scm_loss(
    student_velocity: torch.Tensor,
    teacher_velocity: torch.Tensor,
    tangent: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    warmup_ratio: float = 1.0,
    loss_scale: float = 100.0,
) -> torch.Tensor:
    """sCM loss scale * sum (F_theta - sg(F_theta) - g / (||g|| + 0.1))^2 per sample, float64.

    SPEC-rcm §2.7-2.10. Its value is scale * ||g_hat||^2 and its gradient -2 scale g_hat dF_theta/dtheta.
    `student_velocity` carries the graph; `teacher_velocity` and `tangent` are constants.
    """
    g = scm_target_direction(student_velocity, teacher_velocity, tangent, x_t, t, warmup_ratio)
    bad = nonfinite_samples(g, student_velocity)
    keep = batch_view(~bad, g)
    g = torch.where(keep, g, 0.0)
    F_theta = torch.where(keep, student_velocity.double(), 0.0)
    F_sg = F_theta.detach()
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    g_hat = g / batch_view(norm + TANGENT_NORM_EPS, g)
    return loss_scale * per_sample_sum((F_theta - F_sg - g_hat) ** 2)


def dmd_loss(
    generated: torch.Tensor,
    fake_x0: torch.Tensor,
    real_x0: torch.Tensor,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """DMD loss scale * sum (G - sg(G - Delta))^2, Delta = (x0_fake - x0_real) / lambda_w, per sample.

    SPEC-rcm §3.5-3.7. lambda_w = mean |G - x0_real| per sample, clamped at 1e-5, in float64. The value
    is sum Delta^2; the gradient 2 Delta dG/dtheta moves G toward x0_real - x0_fake.
    """
    bad = nonfinite_samples(generated, fake_x0, real_x0)
    keep = batch_view(~bad, generated)
    # Mask before any arithmetic: a NaN sample must give a zero gradient, not NaN * 0.
    G = torch.where(keep, generated.double(), 0.0)
    real = torch.where(keep, real_x0.detach().double(), 0.0)
    fake = torch.where(keep, fake_x0.detach().double(), 0.0)
    weight = (G.detach() - real).abs().flatten(1).mean(dim=1).clamp_min(1e-5)
    direction = (fake - real) / batch_view(weight, G)
    elementwise = (G - (G - direction).detach()) ** 2
    return loss_scale * per_sample_sum(elementwise)


def fake_score_loss(generated: torch.Tensor, fake_x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow matching of the fake score in x0 form: sum (G - x0_fake)^2 / sin^2 t_D per sample.

    SPEC-rcm §4.1; equals sum ||F_fake - (cos t eps - sin t G)||^2 exactly (derived). G is a constant.
    """
    keep = batch_view(~nonfinite_samples(generated, fake_x0), fake_x0)
    G = torch.where(keep, generated.detach().double(), 0.0)
    fake = torch.where(keep, fake_x0.double(), 0.0)
    return per_sample_sum((G - fake) ** 2 / batch_view(torch.sin(t.double()) ** 2, fake))


def dcm_loss(prediction: torch.Tensor, target: torch.Tensor, loss_scale: float = 100.0) -> torch.Tensor:
    """Discrete-time CM loss scale * sum (P - sg(Y))^2 per sample. SPEC-rcm §5.4."""
    keep = batch_view(~nonfinite_samples(prediction, target), prediction)
    P = torch.where(keep, prediction.double(), 0.0)
    Y = torch.where(keep, target.detach().double(), 0.0)
    return loss_scale * per_sample_sum((P - Y) ** 2)
