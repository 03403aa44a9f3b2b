"""rcmfn.models.registry: per-model knowledge the entrypoints share (the teacher's unconditional input, the
networks distillation trains)."""

from dataclasses import replace

import pytest
import torch

from rcmfn.models.cosmos import CosmosDiT, init_random_, velocity_net
from rcmfn.models.cosmos.configs import TINY_T2I
from rcmfn.models.registry import MODELS, build_model, get_spec, trainable_spec, unconditional_prompt
from rcmfn.models.wan.configs import NEGATIVE_PROMPT
from rcmfn.precond import TIME_SCALE, trigflow_denoiser


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("cosmos")])
def test_cosmos_uncondition_is_zeros_unless_a_negative_prompt_is_given(name):
    """Cosmos-Predict2 learned "unconditional" as an all-zero text embedding: None (zeros) by default and
    for an empty negative prompt, as its text2image pipeline; a given negative prompt is used."""
    spec = get_spec(name)
    assert unconditional_prompt(spec, None) is None
    assert unconditional_prompt(spec, "") is None
    assert unconditional_prompt(spec, "blurry") == "blurry"


@pytest.mark.parametrize("name", ["wan1.3b", "wan14b"])
def test_wan_uncondition_is_its_default_negative_prompt(name):
    spec = get_spec(name)
    assert unconditional_prompt(spec, None) == NEGATIVE_PROMPT and NEGATIVE_PROMPT.startswith("色调艳丽")
    assert unconditional_prompt(spec, "") == ""  # Wan encodes whatever negative prompt it is given
    assert unconditional_prompt(spec, "blurry") == "blurry"


def test_distillation_trains_cosmos_with_the_float32_time_path_and_leaves_the_teacher_and_wan_as_released():
    for name in MODELS:
        spec = get_spec(name)
        if spec.family.name == "cosmos":
            assert trainable_spec(spec).config == replace(spec.config, high_precision_time=True)
            assert not spec.config.high_precision_time  # the teacher: the released bf16 time path
        else:
            assert trainable_spec(spec) is spec  # Wan's released time path is float32 already


def _time_tangent(module, x_t, t, cond):
    """dF/dt at fixed x_t: torch.func.jvp of the TrigFlow denoiser in t (x_t float64, the net in its dtype)."""
    net = velocity_net(module)
    denoise = trigflow_denoiser(lambda p, x, c_noise, c: net(p, x, c_noise / TIME_SCALE, c))  # Cosmos takes r
    params = dict(module.named_parameters())
    with torch.no_grad():
        return torch.func.jvp(lambda time: denoise(params, x_t, time, cond), (t,), (torch.ones_like(t),))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_student_time_tangent_is_bf16_accurate_only_with_the_float32_time_path(seed):
    """The bf16 Cosmos student distillation builds (trainable_spec) has a time tangent dF/dt within one bf16
    unit roundoff (2^-8, relative L2) of a float64 central difference of the same weights; the released
    bf16 time path (the teacher's config) misses it. Measured (tiny net, 8 times in [0.1, 1.5]): float32
    time path 2.9e-3 - 3.2e-3, bf16 time path 5.2e-3 - 5.8e-3; the bf16 blocks bound both (a factor ~2
    apart here, not orders: the float32 path removes the time path's own rounding only)."""
    teacher_spec = replace(get_spec("cosmos2b"), config=TINY_T2I, text_dim=24)
    reference = init_random_(CosmosDiT(TINY_T2I).double(), torch.Generator().manual_seed(seed))
    weights = {k: v.to(torch.bfloat16).double() for k, v in reference.state_dict().items()}
    reference.load_state_dict(weights)  # bf16-representable weights, evaluated in float64
    gen = torch.Generator().manual_seed(seed + 10)
    x_t = torch.randn(8, 16, 1, 4, 4, generator=gen, dtype=torch.float64)
    cond = torch.randn(8, 5, 24, generator=gen, dtype=torch.float64)
    t, h = torch.linspace(0.1, 1.5, 8, dtype=torch.float64), 1e-6
    F = _time_tangent(reference, x_t, t, cond)[0]
    with torch.no_grad():
        F_plus, F_minus = (_time_tangent(reference, x_t, t + d, cond)[0] for d in (h, -h))
    assert F.dtype == torch.float64
    reference_tangent = (F_plus - F_minus) / (2 * h)
    errors = {}
    for name, spec in (("student", trainable_spec(teacher_spec)), ("teacher", teacher_spec)):
        module = build_model(spec, None, dtype=torch.bfloat16)[0]
        module.load_state_dict(weights)
        tangent = _time_tangent(module, x_t, t, cond)[1]
        errors[name] = ((tangent - reference_tangent).norm() / reference_tangent.norm()).item()
    assert errors["student"] <= 2**-8 < errors["teacher"], errors
