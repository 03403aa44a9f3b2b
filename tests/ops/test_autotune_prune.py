"""The attention kernel's autotuner skips configurations whose pipelined tiles cannot fit in shared memory."""

import pytest
import triton

from ops.attention.kernel import (
    FALLBACK_CONFIG,
    TUNING_SPACE,
    _attention_fwd_jvp_tuned,
    fitting_configs,
    pipelined_tile_bytes,
)

H200_SHARED_BYTES = 232448  # max_shared_mem of an H100 / H200 (227 KiB per block)


def _configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [*TUNING_SPACE, FALLBACK_CONFIG]
    ]


def _names(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


def test_tile_bytes_count_k_v_and_their_tangents_per_stage():
    assert pipelined_tile_bytes(64, 128, 3, 2, kv_tangent=True) == 3 * 4 * 64 * 128 * 2
    assert pipelined_tile_bytes(64, 128, 3, 2, kv_tangent=False) == 3 * 2 * 64 * 128 * 2


def test_float32_at_head_dim_128_drops_the_configs_that_cannot_fit():
    kept = _names(fitting_configs(_configs(), 4, 128, True, H200_SHARED_BYTES))
    assert kept == [(128, 32, 8, 3), (64, 32, 4, 3), FALLBACK_CONFIG]


def test_bf16_at_head_dim_128_keeps_the_whole_space():
    assert _names(fitting_configs(_configs(), 2, 128, True, H200_SHARED_BYTES)) == [*TUNING_SPACE, FALLBACK_CONFIG]


@pytest.mark.parametrize("element_bytes", [2, 4])
def test_the_smallest_config_survives_any_limit(element_bytes):
    assert _names(fitting_configs(_configs(), element_bytes, 256, True, 1)) == [FALLBACK_CONFIG]


def test_the_tuner_prunes_with_this_rule():
    assert _attention_fwd_jvp_tuned.early_config_prune is not None


def test_the_hook_falls_back_to_every_config_when_its_arguments_are_not_there():
    from ops.attention.kernel import _prune_for_shared_memory

    assert _names(_prune_for_shared_memory(_configs(), {})) == [*TUNING_SPACE, FALLBACK_CONFIG]
