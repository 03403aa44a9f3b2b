"""Per-sample losses of rCM: sCM, DMD, fake score and discrete-time CM.

Every loss returns a float64 [B] tensor (the loop sums it, as the official trainer does, SPEC-rcm
§2.10) and zeroes a sample whose terms are not finite without touching the others (§2.8, §3.7). The
official code masks only the sCM and DMD losses; the fake-score and dCM losses are masked here too so
that one bad sample never turns a whole batch's gradient into NaN (the official code relies on
nan_to_num of the gradients for those; we do both).
"""

import math

import torch

from rcmfn.precond import batch_view

TANGENT_NORM_EPS = 0.1  # g / (||g|| + 0.1), SPEC-rcm §2.9
WAN_480P_ELEMENTS = 16 * 21 * 60 * 104  # one Wan2.1 480p latent (C, T, H, W), where the paper set lambda = 0.01


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


def dmd_size_factor(elements: int, reference_elements: int | None) -> float:
    """sqrt(N_ref / N): the factor on lambda that gives N-element latents the DMD:sCM balance of N_ref.

    SPEC-rcm errata "DMD vs sCM balance" (derived). The sCM direction is normalised per sample,
    g / (||g|| + 0.1), so its norm is at most 1 whatever N; the DMD direction is normalised per element,
    Delta = (x0_fake - x0_real) / mean |G - x0_real|, so its entries are O(1) and its norm grows like
    sqrt(N). A fixed lambda therefore means a DMD:sCM gradient ratio proportional to sqrt(N): the paper's
    0.01, set on Wan 480p latents (2.1M elements), is 90x weaker on a 256-element toy and 2.8x weaker on
    a Cosmos 1024 px latent (262k). Scaling lambda by sqrt(N_ref / N) keeps the ratio of N_ref-element
    latents: exactly so when the N elements repeat N_ref elements' statistics (a test replicates them).

    Why a reference size and not a per-sample DMD normalisation (Delta / sqrt(N)): the two differ by the
    constant sqrt(N_ref), but only this one keeps lambda in the paper's units (0.01 means the official
    balance at N_ref, and N = N_ref is the official loss bit for bit), and it scales the loss value and
    the gradient alike (dividing Delta would scale the value by 1 / N and the gradient by 1 / sqrt(N)).
    None (or 0) = no scaling, the official per-element normalisation.
    """
    if elements < 1:
        raise ValueError(f"elements must be >= 1; got {elements}")
    if not reference_elements:
        return 1.0
    if reference_elements < 0:
        raise ValueError(f"reference_elements must be >= 0 (0 = off); got {reference_elements}")
    return math.sqrt(reference_elements / elements)


def dmd_loss(
    generated: torch.Tensor,
    fake_x0: torch.Tensor,
    real_x0: torch.Tensor,
    loss_scale: float = 1.0,
    reference_elements: int | None = None,
) -> torch.Tensor:
    """DMD loss scale * sum (G - sg(G - Delta))^2, Delta = (x0_fake - x0_real) / lambda_w, per sample.

    SPEC-rcm §3.5-3.7. lambda_w = mean |G - x0_real| per sample, clamped at 1e-5, in float64. The value
    is sum Delta^2; the gradient 2 Delta dG/dtheta moves G toward x0_real - x0_fake. With
    `reference_elements` the scale is multiplied by `dmd_size_factor` of the sample's element count.
    """
    loss_scale = loss_scale * dmd_size_factor(math.prod(generated.shape[1:]), reference_elements)
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
