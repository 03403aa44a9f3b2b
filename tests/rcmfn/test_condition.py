"""rcmfn/condition.py: a text condition stays a tensor; CFG's uncondition swaps the text only."""

import pytest
import torch

from rcmfn.condition import make_condition, text_of, with_text


def test_a_text_condition_is_the_tensor_and_its_uncondition_the_broadcast_negative():
    text = torch.randn(3, 4, 5, dtype=torch.float64)
    negative = torch.randn(4, 5, dtype=torch.float64)
    assert make_condition(text) is text and text_of(text) is text
    uncond = with_text(text, negative)
    assert uncond.shape == text.shape and torch.equal(uncond[2], negative)


def test_a_structured_condition_indexes_and_keeps_its_extras_under_with_text():
    text, image = torch.randn(3, 4, 5), torch.randn(3, 2, 7)
    cond = make_condition(text, image=image)
    assert cond.shape == (3,) and torch.equal(cond[1:]["image"], image[1:])
    uncond = with_text(cond, torch.randn(4, 5))
    assert uncond["image"] is image and not torch.equal(text_of(uncond), text)
    assert text_of(cond) is text  # the condition itself is unchanged
    with pytest.raises(ValueError, match="batch"):
        make_condition(text, image=image[:2])
    with pytest.raises(ValueError, match="batch"):
        with_text(cond, torch.randn(2, 4, 5))
