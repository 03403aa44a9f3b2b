"""distill --expert: one expert of a two-expert model per run (entrypoints/expert_run.py)."""

import math

import pytest

from entrypoints.config import DistillConfig, loop_config
from entrypoints.expert_run import expert_teacher
from entrypoints.presets import get_preset
from rcmfn.models.registry import get_spec
from rcmfn.time import Truncated


def test_two_expert_models_need_one_expert_per_run_and_others_take_none():
    with pytest.raises(ValueError, match="has two experts: distil one per run with --expert"):
        DistillConfig(model="wan2.2-tiny")
    with pytest.raises(ValueError, match="--expert high: model 'wan-tiny' has one network"):
        DistillConfig(model="wan-tiny", expert="high")
    with pytest.raises(ValueError, match="one network"):
        DistillConfig(expert="low")  # the toy


@pytest.mark.parametrize("expert", ["high", "low"])
def test_an_expert_run_trains_over_its_range_with_its_guidance(expert):
    switch, preset = get_spec("wan2.2-tiny").experts, get_preset("wan2.2-tiny")
    loss = loop_config(DistillConfig(model="wan2.2-tiny", expert=expert)).loss
    lo, hi = switch.trig_range(expert)
    assert loss.p_G == Truncated(preset.p_G, lo, hi) and loss.p_D == Truncated(preset.p_D, lo, hi)
    assert loss.guidance == {"high": 4.0, "low": 3.0}[expert]
    assert loss.rollout_start == (None if expert == "high" else pytest.approx(math.atan(7.0)))
    assert loop_config(DistillConfig(model="wan2.2-tiny", expert=expert, guidance=6.0)).loss.guidance == 6.0
    one = loop_config(DistillConfig(model="wan-tiny")).loss  # a one-network model: unchanged
    assert one.p_G == get_preset("wan-tiny").p_G and one.rollout_start is None


def test_an_expert_runs_teacher_is_its_folder_of_the_release(tmp_path):
    for folder in ("high_noise_model", "low_noise_model", "transformer", "transformer_2"):
        (tmp_path / folder).mkdir()
    assert expert_teacher(tmp_path, "official", "wan2.2-tiny", "low") == tmp_path / "low_noise_model"
    assert expert_teacher(tmp_path, "diffusers", "wan2.2-tiny", "high") == tmp_path / "transformer"
    assert expert_teacher(tmp_path / "x.safetensors", "official", "wan-tiny", None) == tmp_path / "x.safetensors"
