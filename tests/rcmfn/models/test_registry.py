"""rcmfn.models.registry: per-model knowledge the entrypoints share (the teacher's unconditional input)."""

import pytest

from rcmfn.models.registry import MODELS, get_spec, unconditional_prompt
from rcmfn.models.wan.configs import NEGATIVE_PROMPT


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
