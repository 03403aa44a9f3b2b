"""Model presets: a flat table of typed instances, looked up exactly (`--model` choices are its keys)."""

from dataclasses import dataclass, field, replace
from typing import Literal

from rcmfn.loop import OptimConfig
from rcmfn.losses import WAN_480P_ELEMENTS
from rcmfn.rollout import BACKWARD_TIMESTEPS
from rcmfn.samplers import PAPER_MID_TIMES
from rcmfn.time import LogNormal, TimeDistribution, UniformShift

RolloutTimes = Literal["drawn", "mid-times"]


@dataclass(frozen=True)
class ModelPreset:
    """Per-model defaults of the distillation (SPEC-rcm §10.1); every field can be overridden.

    No preset trains in stages: the official experiment configs are one-method runs (cm_type "scm" with a
    fake score, SPEC-rcm §10.1) and the README's staged advice gives no stage lengths in the stored
    snapshot, so `--stages` (rcmfn/stages.py) is opt-in; docs/toy.md "Staged training" measures it.
    """

    description: str
    iterations: int
    guidance: float
    """teacher CFG as the standard weight w of F_u + w (F_c - F_u) (--guidance; docs/guidance.md)"""
    p_G: TimeDistribution
    p_D: TimeDistribution
    tangent_warmup: int
    student_update_freq: int
    optim: OptimConfig = field(default_factory=OptimConfig)
    sigma_max: float = 80.0
    """start noise level of the few-step student sampler (entrypoints/sample.py --sigma-max default)"""
    dmd_weight: float = 0.01
    """lambda of L_sCM + lambda L_DMD (SPEC-rcm §3, paper: 0.01)"""
    dmd_reference_elements: int = 0
    """N_ref of rcmfn.losses.dmd_size_factor (lambda times sqrt(N_ref / N)); 0 = the official per-element DMD"""
    mid_times: tuple[float, ...] = PAPER_MID_TIMES
    """intermediate trig times of the multi-step student sampler (--mid-times default): the model's own"""
    rollout_times: RolloutTimes = "drawn"
    """mid times of the DMD / critic rollouts (--rollout-times): the official running-minimum draws from p_D"""
    max_rollout_steps: int = 4
    """rollouts cycle through 1..N steps (--max-rollout-steps; the official max_simulation_steps_fake)"""
    fps: int = 16
    """frame rate of sampled videos (sample --fps default): Wan2.1's 16 (Wan-Video/Wan2.1
    wan/configs/shared_config.py sample_fps)"""
    teacher_shift: float = 5.0
    """time shift of the teacher's Euler sampler (entrypoints/sample.py --shift default): Wan's 5.0"""
    image_fraction: float = 0.0
    """share of training samples conditioned on their own first latent frame (--image-fraction default;
    families with an image-to-video mode on the latent itself: Wan2.2 TI2V, rcmfn/models/wan/ti2v.py)"""


# The EMA length and sampler mid times the toy's studies were measured with (docs/digits.md,
# entrypoints/experts_toy_study.py); they keep them where the mixture toy's preset moved on (EMA 0.1, mid
# times (1.0, 0.8, 0.5)).
TOY_STUDIES_EMA_RATE = 0.05
TOY_STUDIES_MID_TIMES = (1.1, 0.9, 0.6)

MODELS: dict[str, ModelPreset] = {
    # The CPU toy: learning rates are those of a 100k-parameter net, not a 1B one; a short tangent
    # warm-up because the run is short; p_G centred at sigma 1, lower than Wan's (the toy's modes are
    # resolved at small sigma: the latent has 256 dims, not 1.3M) but above the paper's -0.8, because the
    # band rows put the students' between-mode samples at sigma >= 2 (TV 0.06 -> 0.04 at 2 steps); mid
    # times below the official 1.5 / 1.4 (sigma 14, 5.8), where the student's one-step map from the exact
    # marginal still leaves 11-13 % of samples between modes; lambda with N_ref = Wan 480p (paper units)
    # at a third of the paper's balance, 0.3 per element on 256 elements; DMD's rollouts the official ones
    # (drawn mid times, 1-4 steps): with the patch-4 net of entrypoints/toy.py, rollouts along the sampler's
    # own mid times (`--rollout-times mid-times --max-rollout-steps 2`, which the patch-2 net needed) contract
    # the 2-step samples (spread 0.83) or drop a mode (seed 0); 3500 iterations and the official EMA length
    # 0.1 because 2500 and 0.05 met the bar at 6 of 8 seeds (a contracted 2-step sampler, a mode weight off;
    # the raw student's mode weights swing from step to step) and 3500 with 0.1 at 8 of 8; mid times
    # (1.0, 0.8, 0.5), one step lower than (1.1, 0.9, 0.6), because over 16 seeds the students' worst-case
    # 2-step spread, mode weights and 4-step off-mode share were best there and 14 seeds met the bar (13 with
    # the old grid; the map from lower sigma is the more reliable one); docs/toy.md "Default run".
    "toy": ModelPreset(
        description="analytic Gaussian-mixture teacher, tiny DiT student (CPU, minutes)",
        iterations=3500,
        guidance=2.0,
        p_G=LogNormal(0.0, 1.6),
        p_D=LogNormal(0.0, 1.6),
        tangent_warmup=100,
        student_update_freq=3,
        optim=OptimConfig(
            student_lr=1e-4, fake_lr=2e-4, betas=(0.0, 0.999), weight_decay=0.0, lr_warmup_steps=50, ema_rate=0.1
        ),
        mid_times=(1.0, 0.8, 0.5),  # chosen on the toy over 16 seeds, band diagnostic as the reason (docs/toy.md)
        dmd_weight=0.0033,
        dmd_reference_elements=WAN_480P_ELEMENTS,
    ),
    "wan1.3b": ModelPreset(
        description="Wan2.1 T2V 1.3B (SPEC-rcm §10.1, 1.3B experiment)",
        iterations=100_000,
        guidance=5.0,
        # -0.8 + ln(20) / 2 = 0.698: the paper's p_G rule (Table 4) at the 1.3B's 20 latent frames, the
        # registry's latent_shape (rcmfn/models/registry.py) and prepare's default size.
        p_G=LogNormal(0.7, 1.6),
        p_D=UniformShift(5.0),
        tangent_warmup=1000,
        student_update_freq=5,
        optim=OptimConfig(student_lr=2e-6, fake_lr=4e-7),
        mid_times=BACKWARD_TIMESTEPS,  # the official Wan inference script (NVlabs/rcm wan2pt1_t2v_rcm_infer.py:145)
    ),
    "wan14b": ModelPreset(
        description="Wan2.1 T2V 14B (SPEC-rcm §10.1, 14B experiment)",
        iterations=100_000,
        guidance=5.0,
        p_G=LogNormal(1.5, 1.6),
        p_D=UniformShift(5.0),
        tangent_warmup=0,
        student_update_freq=10,
        optim=OptimConfig(student_lr=1e-6, fake_lr=1e-7),
        # Inference as the official Wan script for both sizes: sigma_max 80 (NVlabs/rcm
        # rcm/inference/wan2pt1_t2v_rcm_infer.py:73), mid times (1.5, 1.4, 1.0) (:145). The 14B experiment's
        # 200 (rcm/configs/experiments/rcm/wan2pt1_t2v.py:194) only feeds its training-time sample callback.
        sigma_max=80.0,
        mid_times=BACKWARD_TIMESTEPS,
    ),
    "cosmos2b": ModelPreset(
        description="Cosmos-Predict2 2B text-to-image (paper's Cosmos settings)",
        iterations=30_000,
        # Paper Table 4 "CFG Scale 4.5", read as the standard w like the Wan 5.0 in the same row (the released
        # rCM code applies that one as F_u + w (F_c - F_u)). If the 4.5 is in the Cosmos code's form
        # x0_c + g (x0_c - x0_u) instead, the standard weight is standard_guidance_from_cosmos(4.5) = 5.5
        # (--guidance 5.5). The sources do not settle which: docs/guidance.md.
        guidance=4.5,
        p_G=LogNormal(-0.8, 1.6),
        p_D=LogNormal(0.0, 1.6),
        tangent_warmup=0,
        student_update_freq=5,
        optim=OptimConfig(student_lr=1e-6, fake_lr=2e-7),
        mid_times=PAPER_MID_TIMES,  # paper App. D and the Cosmos distilled sampler (rcmfn/samplers.py)
    ),
    "cosmos14b": ModelPreset(
        description="Cosmos-Predict2 14B text-to-image (paper's Cosmos settings)",
        iterations=25_000,
        guidance=4.5,  # standard w; see cosmos2b and docs/guidance.md (5.5 under the Cosmos-form reading)
        p_G=LogNormal(-0.8, 1.6),
        p_D=LogNormal(0.0, 1.6),
        tangent_warmup=0,
        student_update_freq=5,
        optim=OptimConfig(student_lr=1e-6, fake_lr=2e-7),
        sigma_max=800.0,  # paper Table 4 (sigma_max 80 / 80 / 800 for 0.6B / 2B / 14B)
        mid_times=PAPER_MID_TIMES,
    ),
    # Wan2.2 TI2V-5B, text- and image-to-video distillation (rcmfn/models/wan/ti2v.py). No official rCM
    # experiment exists for the 5B (NVlabs/rcm ships Wan2.1 T2V 1.3B / 14B configs and a Wan2.2 A14B I2V
    # inference script), so the optimiser and loop values are the nearest size's, the 1.3B experiment (SPEC-rcm §10.1).
    "wan2.2-ti2v-5b": ModelPreset(
        description="Wan2.2 TI2V-5B text- and image-to-video, 121 frames of 1280 x 704 (1.3B experiment's recipe)",
        iterations=100_000,  # 1.3B experiment (SPEC-rcm §10.1)
        guidance=5.0,  # sample_guide_scale, Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py:35
        # The paper's p_G rule (Table 4; SPEC-rcm §13.2), mean -0.8 + ln(T) / 2 = 0.917 at the registry's
        # T = 31 latent frames (121 frames, wan_ti2v_5B.py:36).
        p_G=LogNormal(0.9, 1.6),
        p_D=UniformShift(5.0),  # the Wan recipe's shift 5, = the release's sample_shift (wan_ti2v_5B.py:33)
        tangent_warmup=1000,  # 1.3B experiment
        student_update_freq=5,  # 1.3B experiment
        optim=OptimConfig(student_lr=2e-6, fake_lr=4e-7),  # 1.3B experiment
        sigma_max=80.0,  # official Wan inference (NVlabs/rcm rcm/inference/wan2pt1_t2v_rcm_infer.py:73)
        mid_times=BACKWARD_TIMESTEPS,  # same script :145
        fps=24,  # sample_fps, wan_ti2v_5B.py:32
        # The release serves text-to-video and image-to-video with one network (wan/textimage2video.py), so
        # the student learns both; the share is the release's only trace of its training mix, the default
        # p = 0.2 of masks_like (Wan-Video/Wan2.2 wan/utils/utils.py:172), which keeps the first frame clean
        # for that share of the samples when given a generator.
        image_fraction=0.2,
    ),
}
# Wan2.1 I2V 14B. The rCM paper and NVlabs/rcm release no Wan2.1 I2V recipe, so the distillation values are
# the T2V 14B experiment's (above; same transformer width and depth). The sampling values are the official
# I2V generator's (Wan-Video/Wan2.1 generate.py): guidance 5.0 (--sample_guide_scale default, :242-246),
# shift 3.0 at 832 x 480 and 5.0 otherwise (:76-79, "recommended ... 480p ... 3.0" in
# wan/image2video.py:159); 81 frames (:84-85) and the sizes are the registry's latent shapes.
MODELS["wan-i2v-14b-480p"] = replace(
    MODELS["wan14b"], description="Wan2.1 I2V 14B 480p (T2V 14B recipe; official I2V sampling)", teacher_shift=3.0
)
MODELS["wan-i2v-14b-720p"] = replace(
    MODELS["wan14b"], description="Wan2.1 I2V 14B 720p (T2V 14B recipe; official I2V sampling)", teacher_shift=5.0
)
# Wan2.2 T2V A14B: each expert is distilled by its own run (--expert high / low; docs/toy.md "Two experts"),
# with the Wan2.1 14B rCM recipe above (iterations, p_G, p_D, learning rates, update frequency: the experts
# have the 14B architecture and no rCM training config of Wan2.2 is public). Each run's teacher guidance
# defaults to its expert's own sample_guide_scale (4.0 high, 3.0 low: Wan-Video/Wan2.2
# wan/configs/wan_t2v_A14B.py; `guidance` below, the high expert's, applies only without --expert); the
# teacher sampler uses the release's sample_shift 12.0 (same file); the student samples as the released rCM
# Wan2.2 script: mid times (1.5, 1.4, 1.0) (NVlabs/rcm rcm/inference/wan2pt2_i2v_rcm_infer.py, `mid_t`),
# sigma_max 80 as the Wan2.1 T2V script (the I2V script's default is 200, its 720p I2V setting).
MODELS["wan2.2-t2v-a14b"] = replace(
    MODELS["wan14b"],
    description="Wan2.2 T2V A14B, two experts distilled one run each (--expert high / low)",
    guidance=4.0,
    teacher_shift=12.0,
)
# The registry's tiny nets (CPU runs and tests) train with their family's recipe.
MODELS["wan-tiny"] = replace(MODELS["wan1.3b"], description="tiny random Wan2.1-architecture net (CPU tests)")
MODELS["wan2.2-a14b-tiny"] = replace(
    MODELS["wan2.2-t2v-a14b"], description="tiny random two-expert Wan net (CPU tests)"
)
MODELS["cosmos-tiny"] = replace(MODELS["cosmos2b"], description="tiny random Cosmos-architecture net (CPU tests)")
MODELS["wan2.2-tiny"] = replace(MODELS["wan2.2-ti2v-5b"], description="tiny random Wan2.2 TI2V-shaped net (CPU tests)")
MODELS["wan-i2v-tiny"] = replace(MODELS["wan-i2v-14b-480p"], description="tiny random Wan2.1 I2V net (CPU tests)")


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; an unknown name lists the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]
