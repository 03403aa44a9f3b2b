"""rcmfn.models.lora_extract: truncated-SVD LoRA of a weight difference, exact where it can be (float64)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.models.lora_extract import extract_lora, relative_errors, target_group, target_names
from rcmfn.models.lora_formats import merge_adapter

F64 = torch.float64


def weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=F64) for n, s in shapes.items()}


SHAPES = {
    "blocks.0.attn.q.weight": (6, 5),
    "blocks.1.attn.q.weight": (6, 5),
    "blocks.0.ffn.0.weight": (7, 5),
    "blocks.0.ffn.0.bias": (7,),  # not a 2-D weight: never a target
    "blocks.0.norm.weight": (5,),
    "head.weight": (4, 5),  # outside the blocks: not a default target
}


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, 4))
def test_a_difference_of_exact_rank_r_is_recovered_to_float64_rounding(seed, rank):
    teacher = weights(SHAPES, seed)
    g = torch.Generator().manual_seed(seed + 1)
    student = dict(teacher)
    for name in target_names(teacher):
        out, inp = teacher[name].shape
        student[name] = teacher[name] + torch.randn(out, rank, generator=g, dtype=F64) @ torch.randn(
            rank, inp, generator=g, dtype=F64
        )
    factors, errors = extract_lora(student, teacher, rank)
    assert set(factors) == {"blocks.0.attn.q.weight", "blocks.1.attn.q.weight", "blocks.0.ffn.0.weight"}
    merged = merge_adapter(teacher, factors)
    for name in student:
        torch.testing.assert_close(merged[name], student[name], rtol=0, atol=1e-12)
    assert all(f.rank == rank and f.scale == 1.0 for f in factors.values())
    assert max(relative_errors(errors).values()) < 1e-13


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, 5))
def test_a_random_differences_error_is_the_svd_tail(seed, rank):
    """Eckart-Young: ||D - D_R||_F^2 = sum of the squared singular values past R (svdvals, independently)."""
    teacher, student = weights(SHAPES, seed), weights(SHAPES, seed + 7)
    _, errors = extract_lora(student, teacher, rank)
    for name, e in errors.items():
        s = torch.linalg.svdvals(student[name] - teacher[name])
        assert e.residual_sq == pytest.approx(s[rank:].square().sum().item(), rel=1e-9, abs=1e-20)
        assert e.difference_sq == pytest.approx(s.square().sum().item(), rel=1e-12)
    groups = relative_errors(errors)
    q = [errors[f"blocks.{i}.attn.q.weight"] for i in (0, 1)]
    expected_q = (sum(e.residual_sq for e in q) / sum(e.difference_sq for e in q)) ** 0.5
    assert groups["attn.q.weight"] == pytest.approx(expected_q, rel=1e-12)
    assert set(groups) == {"attn.q.weight", "ffn.0.weight", "overall"}
    assert 0 < groups["overall"] < 1 if rank < 5 else groups["overall"] < 1e-13


def test_rank_beyond_the_matrix_is_exact_and_zero_difference_reports_zero():
    teacher = weights(SHAPES, 0)
    student = {**teacher, "blocks.0.ffn.0.weight": teacher["blocks.0.ffn.0.weight"] + 1.0}
    factors, errors = extract_lora(student, teacher, rank=50)
    assert factors["blocks.0.ffn.0.weight"].rank == 5
    errs = relative_errors(errors)
    assert errs["attn.q.weight"] == 0.0 and errs["overall"] < 1e-13


def test_factors_take_the_requested_dtype_and_the_error_counts_its_rounding():
    teacher, student = weights(SHAPES, 1), weights(SHAPES, 2)
    f64, e64 = extract_lora(student, teacher, rank=5)
    bf16, e16 = extract_lora(student, teacher, rank=5, dtype=torch.bfloat16)
    assert all(f.down.dtype == torch.bfloat16 for f in bf16.values())
    assert relative_errors(e64)["overall"] < 1e-13 < 1e-3 < relative_errors(e16)["overall"]


def test_groups_strip_the_block_index_of_either_family():
    assert target_group("blocks.12.self_attn.q.weight") == "self_attn.q.weight"
    assert target_group("transformer_blocks.3.attn1.to_q.weight") == "attn1.to_q.weight"
    assert target_group("head.head.weight") == "head.head.weight"


def test_bad_requests_are_refused_by_name():
    teacher = weights(SHAPES, 0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        extract_lora(teacher, teacher, 0)
    with pytest.raises(ValueError, match="no 2-D weight matches"):
        extract_lora(teacher, teacher, 2, ("nothing.*",))
    smaller = {k: v for k, v in teacher.items() if k != "blocks.0.ffn.0.weight"}
    with pytest.raises(ValueError, match="teacher weight blocks.0.ffn.0.weight: missing"):
        extract_lora(teacher, smaller, 2)
