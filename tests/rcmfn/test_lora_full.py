"""LoraConfig.full: tensors trained in full beside the adapters (biases, the layers outside the blocks).

float64 networks with random weights (tests/rcmfn/test_lora.py's `adapted`); the reference is the plain
network over `merge`d weights, where each fully trained tensor replaces its frozen one.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.loop import _optimizer_step
from rcmfn.lora import BLOCK_PREFIX, FULL_LR_SCALE, LoraConfig, fully_trained_keys, merge, optimizer_groups
from rcmfn.models.registry import get_spec, random_model
from rcmfn.tangent import scm_tangent
from tests.rcmfn.test_lora import NETS, T, adapted


def config(name: str) -> LoraConfig:
    """Both scopes; Cosmos-Predict2's linears have no biases, so only the layers outside its blocks."""
    full = ("outside-blocks",) if name == "cosmos-tiny" else ("biases", "outside-blocks")
    return LoraConfig(2, None, ("attention", "ffn", "modulation"), full)


def with_full(name: str, seed: int = 0):
    """`adapted` plus every fully trained tensor, moved away from its frozen value."""
    cfg = config(name)
    plain, lora, weights, adapters, x, cond = adapted(name, cfg, seed)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    low_rank_keys = {k.rsplit(".lora_", 1)[0] for k in adapters.keys()}
    keys = fully_trained_keys(shapes, cfg.full, sorted(low_rank_keys))
    g = torch.Generator().manual_seed(seed + 3)
    for k in keys:
        adapters[k] = weights[k] + 0.2 * torch.randn(weights[k].shape, generator=g, dtype=torch.float64)
    return plain, lora, weights, adapters, keys, x, cond


@pytest.mark.parametrize("name", NETS)
def test_biases_and_the_layers_outside_the_blocks_are_picked_never_an_adapted_weight(name):
    _, _, weights, adapters, keys, _, _ = with_full(name)
    adapted_weights = {k.rsplit(".lora_", 1)[0] for k in adapters.keys() if ".lora_" in k}
    assert keys and not set(keys) & adapted_weights
    biases = "biases" in config(name).full
    picked = lambda k: (biases and k.endswith(".bias")) or not k.startswith(BLOCK_PREFIX)  # noqa: E731
    assert keys == [k for k in weights if k not in adapted_weights and picked(k)]
    assert any(not k.startswith(BLOCK_PREFIX) for k in keys)
    assert biases == any(k.startswith(BLOCK_PREFIX) for k in keys)  # inside the blocks: only biases
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if biases:
        assert fully_trained_keys(shapes, ("biases",), []) == [k for k in weights if k.endswith(".bias")]
    else:
        with pytest.raises(ValueError, match="'biases' matches no parameter"):
            fully_trained_keys(shapes, ("biases",), [])


@pytest.mark.parametrize("name", NETS)
def test_the_adapted_net_with_full_tensors_equals_the_net_over_merged_weights(name):
    plain, lora, weights, adapters, keys, x, cond = with_full(name)
    merged = merge(weights, adapters)
    assert all(torch.equal(merged[k], adapters[k]) for k in keys)
    torch.testing.assert_close(lora(adapters, x, T, cond), plain(merged, x, T, cond), rtol=1e-12, atol=1e-12)
    # the sCM tangent (in x and t) through the adapted net is the merged net's
    dx, f = torch.randn_like(x), torch.randn_like(x)
    got = scm_tangent(lora, adapters, x, T, cond, f, "jvp")
    want = scm_tangent(plain, merged, x, T, cond, f, "jvp")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    del dx


@pytest.mark.parametrize("name", NETS)
def test_gradients_reach_the_adapters_and_the_full_tensors_only(name):
    _, lora, weights, adapters, keys, x, cond = with_full(name)
    frozen = {k: v.requires_grad_(True) for k, v in weights.items()}
    trained = {k: v.detach().requires_grad_(True) for k, v in adapters.items()}
    lora(trained, x, T, cond).square().sum().backward()
    assert all(v.grad is not None and v.grad.abs().max() > 0 for k, v in trained.items() if k in keys)
    # the frozen tensors they replace take no part (the others would get gradients here, as they require it)
    assert all(frozen[k].grad is None for k in keys)
    assert any(v.grad is not None for k, v in frozen.items() if k not in keys)


def test_full_tensors_step_at_their_scale_of_the_rate():
    """One AdamW step with betas (0, 0.999): every element moves by lr (adapters) or lr * FULL_LR_SCALE."""
    g = torch.Generator().manual_seed(0)
    params = {
        "a.weight.lora_down": torch.randn(2, 5, generator=g, dtype=torch.float64),
        "a.weight.lora_up": torch.randn(4, 2, generator=g, dtype=torch.float64),
        "a.bias": torch.randn(4, generator=g, dtype=torch.float64),
    }
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    groups = optimizer_groups(params)
    assert [g["lr_scale"] for g in groups] == [1.0, FULL_LR_SCALE] and groups[1]["params"] == [params["a.bias"]]
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.0, eps=1e-30)
    for v in params.values():
        v.grad = torch.randn(v.shape, generator=g, dtype=torch.float64)
    from rcmfn.loop import OptimConfig

    _optimizer_step(opt, 1e-2, 10_000, OptimConfig(lr_warmup_steps=0))
    for k, v in params.items():
        scale = FULL_LR_SCALE if k == "a.bias" else 1.0
        torch.testing.assert_close((v.detach() - before[k]).abs(), torch.full_like(v, 1e-2 * scale), rtol=1e-6, atol=0)
    assert len(optimizer_groups({"w": params["a.bias"]})) == 1  # full fine-tuning: one group at the rate


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_merge_puts_each_full_tensor_in_place_and_adds_each_delta(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    f64 = {"generator": g, "dtype": torch.float64}
    W = {"a.weight": torch.randn(rows, cols, **f64), "a.bias": torch.randn(rows, **f64)}
    down, up = torch.randn(1, cols, **f64), torch.randn(rows, 1, **f64)
    bias = torch.randn(rows, generator=g, dtype=torch.float64)
    merged = merge(W, {"a.weight.lora_down": down, "a.weight.lora_up": up, "a.bias": bias}, alpha=3.0)
    assert torch.equal(merged["a.bias"], bias)
    torch.testing.assert_close(merged["a.weight"], W["a.weight"] + 3.0 * up @ down, rtol=1e-14, atol=1e-14)


def test_bad_full_training_settings_are_named():
    with pytest.raises(ValueError, match=r"unknown lora full-training scopes \['norms'\]"):
        LoraConfig(2, None, ("attention",), ("norms",))
    with pytest.raises(ValueError, match="train beside adapters: need rank > 0"):
        LoraConfig(0, None, ("attention",), ("biases",))
    with pytest.raises(ValueError, match="'biases' matches no parameter"):
        fully_trained_keys({"blocks.0.q.weight": (2, 2)}, ("biases",), [])
    W = {"a.bias": torch.ones(3)}
    with pytest.raises(ValueError, match=r"fully trained a.bias \(4,\) does not fit the network's \(3,\)"):
        merge(W, {"a.bias": torch.ones(4)})
    with pytest.raises(ValueError, match="fully trained b.bias: no such tensor"):
        merge(W, {"b.bias": torch.ones(3)})


def test_every_family_keeps_its_transformer_blocks_under_the_block_prefix():
    """'outside-blocks' relies on it: a family whose blocks were named otherwise would train them in full."""
    for name in ("wan-tiny", "cosmos-tiny"):
        module = random_model(get_spec(name).with_blocks(2), torch.float32)
        assert isinstance(module.blocks, torch.nn.ModuleList) and len(module.blocks) == 2
        inside = {f"{BLOCK_PREFIX}{n}" for n, _ in module.blocks.named_parameters()}
        assert inside == {n for n, _ in module.named_parameters() if n.startswith(BLOCK_PREFIX)}
