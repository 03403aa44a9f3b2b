"""rcmfn/lora.py and rcmfn/lora_linear.py: the adapter set, its start, the merge and the low-rank path.

Every network is float64 with random (never zero) weights: the toy's tiny DiT, wan-tiny and cosmos-tiny
cut to one block. The reference is always the plain network over merged weights (`merge`).
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn.lora import LoraConfig, adapted_keys, adapter_pairs, init_adapters, merge
from rcmfn.lora_linear import LoraLinear, adapt_module, adapter_key, lora_denoiser, module_name, with_adapters
from rcmfn.models.registry import get_spec, random_model
from rcmfn.precond import trigflow_denoiser
from rcmfn.tangent import scm_tangent
from rcmfn.toy.tiny_dit import LORA_TARGETS, TinyDiT, TinyDiTConfig
from rcmfn.toy.tiny_dit import velocity_net as toy_velocity_net

NETS = ["toy", "wan-tiny", "cosmos-tiny"]


def random_weights(module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in module.named_parameters()}


def network(name: str):
    """(module, velocity net over a module, lora target patterns, inputs (x, c_noise, cond))."""
    g = torch.Generator().manual_seed(7)
    if name == "toy":
        module = TinyDiT(TinyDiTConfig(width=16, depth=1, heads=2, text_dim=8, freq_dim=8)).double()
        x, cond = torch.randn(2, 4, 1, 4, 4, generator=g), torch.randn(2, 3, 8, generator=g)
        return module, toy_velocity_net, LORA_TARGETS, (x.double(), cond.double())
    spec = get_spec(name).with_blocks(1)
    module = random_model(spec, torch.float64)
    x = torch.randn(2, 16, 2, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 3, spec.text_dim, generator=g, dtype=torch.float64)
    return module, spec.velocity_net, spec.lora_targets, (x, cond)


def adapted(name: str, cfg: LoraConfig, seed: int = 0, nonzero_up: bool = True):
    """(plain denoiser, adapted denoiser over adapters, frozen weights, adapters, x, cond)."""
    module, velocity, patterns, (x, cond) = network(name)
    weights = random_weights(module, seed)
    lora_module = copy.deepcopy(module)
    keys = adapt_module(lora_module, patterns, cfg)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    adapters = init_adapters(shapes, keys, cfg.rank, torch.Generator().manual_seed(seed + 1), torch.float64)
    if nonzero_up:  # a trained-looking adapter: up away from its zero start
        g = torch.Generator().manual_seed(seed + 2)
        adapters = adapters.apply(lambda t: t + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    plain = trigflow_denoiser(velocity(module), time_dtype=torch.float64)
    lora = lora_denoiser(trigflow_denoiser(velocity(lora_module), time_dtype=torch.float64), weights)
    return plain, lora, weights, adapters, x, cond


def full_rank(name: str) -> int:
    """The largest rank every adapted weight allows (cosmos-tiny: its cross-attention k, v take 24-wide text)."""
    return {"toy": 16, "wan-tiny": 32, "cosmos-tiny": 24}[name]


T = torch.tensor([0.3, 1.1], dtype=torch.float64)


@pytest.mark.parametrize("name", NETS)
def test_full_rank_adapters_with_zero_up_reproduce_the_teacher_exactly(name):
    cfg = LoraConfig(rank=full_rank(name), alpha=3.0, targets=("attention", "ffn"))
    plain, lora, weights, adapters, x, cond = adapted(name, cfg, nonzero_up=False)
    assert all((adapters[k] != 0).all() for k in adapters.keys() if k.endswith(".lora_down"))
    assert torch.equal(lora(adapters, x, T, cond), plain(weights, x, T, cond))


@pytest.mark.parametrize("name", NETS)
def test_adapted_net_equals_the_net_over_merged_weights(name):
    targets = ("attention", "ffn", "modulation")
    cfg = LoraConfig(rank=3, alpha=5.0, targets=targets)
    plain, lora, weights, adapters, x, cond = adapted(name, cfg)
    merged = merge(weights, adapters, alpha=5.0)
    changed = [k for k in weights if not torch.equal(merged[k], weights[k])]
    assert sorted(changed) == sorted(adapter_pairs(adapters))
    out, ref = lora(adapters, x, T, cond), plain(merged, x, T, cond)
    assert not torch.allclose(ref, plain(weights, x, T, cond))  # the adapters matter
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NETS)
def test_adapted_tangent_in_x_and_t_equals_the_merged_nets_tangent(name):
    cfg = LoraConfig(rank=2, alpha=4.0)
    plain, lora, weights, adapters, x, cond = adapted(name, cfg)
    velocity = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    F_lora, tangent = scm_tangent(lora, adapters, x, T, cond, velocity)
    F_ref, tangent_ref = scm_tangent(plain, merge(weights, adapters, alpha=4.0), x, T, cond, velocity)
    torch.testing.assert_close(F_lora, F_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, tangent_ref, rtol=1e-10, atol=1e-10)
    assert tangent.abs().max() > 1e-3


@pytest.mark.parametrize("name", NETS)
def test_gradients_reach_only_the_adapters(name):
    cfg = LoraConfig(rank=2, targets=("attention", "ffn", "modulation"))
    _, lora, weights, adapters, x, cond = adapted(name, cfg)
    adapters = adapters.apply(lambda t: t.requires_grad_(True))
    frozen = {k: v.requires_grad_(False) for k, v in weights.items()}
    lora(adapters, x, T, cond).square().sum().backward()
    assert all(v.grad is None for v in frozen.values())
    for key, value in adapters.items():
        assert value.grad is not None and value.grad.abs().max() > 0, key


def test_the_merge_is_the_scaled_low_rank_product():
    g = torch.Generator().manual_seed(0)
    W, down, up = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 7), (2, 7), (5, 2)))
    merged = merge({"a.weight": W, "b": W}, {"a.weight.lora_down": down, "a.weight.lora_up": up}, alpha=3.0)
    torch.testing.assert_close(merged["a.weight"], W + 1.5 * up @ down, rtol=0, atol=1e-14)
    assert merged["b"] is W


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9), st.integers(1, 5), st.booleans(), st.integers(0, 2**31))
def test_lora_linear_equals_the_linear_over_the_merged_weight(n_in, n_out, rank, tokens, bias, seed):
    """Property: the low-rank path of any shape (odd, rank above the dims included) is the merge."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(n_in, n_out, bias=bias).double()
    layer = LoraLinear(base, rank, scale=0.7)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    weight = layer.weight + 0.7 * layer.lora_up @ layer.lora_down
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, layer.bias), rtol=1e-12, atol=1e-12)


def test_init_adapters_starts_up_at_zero_and_down_within_the_kaiming_bound():
    shapes = {"l.weight": (6, 50)}
    adapters = init_adapters(shapes, ["l.weight"], 4, torch.Generator().manual_seed(0), torch.float64)
    assert adapters["l.weight.lora_up"].shape == (6, 4) and (adapters["l.weight.lora_up"] == 0).all()
    down = adapters["l.weight.lora_down"]
    assert down.shape == (4, 50) and down.abs().max() <= 1 / math.sqrt(50) and down.std() > 0.05
    again = init_adapters(shapes, ["l.weight"], 4, torch.Generator().manual_seed(0), torch.float32)
    assert torch.equal(again["l.weight.lora_down"], down.float())


def test_module_names_round_trip_the_convention():
    assert module_name("blocks.0.ffn.0.weight.lora_up") == "blocks.0.ffn.0.lora_up"
    assert adapter_key("blocks.0.ffn.0.lora_down") == "blocks.0.ffn.0.weight.lora_down"
    params = with_adapters({"w": torch.ones(1)}, {"a.weight.lora_down": torch.ones(1)})
    assert sorted(params) == ["a.lora_down", "w"]
    with pytest.raises(ValueError, match="not '<weight key"):
        module_name("a.bias.lora_down")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": -1}, "rank must be >= 0"),
        ({"rank": 2, "targets": ("attention", "norms")}, r"unknown lora targets \['norms'\]"),
        ({"rank": 2, "alpha": 0.0}, "alpha must be finite and > 0"),
        ({"rank": 2, "targets": ()}, "at least one target"),
    ],
)
def test_bad_lora_configs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_rank_above_a_weights_smaller_side_and_missing_targets_are_named():
    shapes = {"blocks.0.self_attn.q.weight": (16, 16), "blocks.0.mlp.0.weight": (32, 16)}
    with pytest.raises(ValueError, match=r"rank 17 exceeds min\(out, in\) = 16 of blocks.0.self_attn.q.weight"):
        adapted_keys(shapes, LORA_TARGETS, ("attention",), 17)
    with pytest.raises(ValueError, match="'modulation' matches no 2-D weight"):
        adapted_keys(shapes, LORA_TARGETS, ("modulation",), 2)
    with pytest.raises(ValueError, match=r"targets \['ffn'\] do not exist for this network"):
        adapted_keys(shapes, {"attention": ("*q.weight",)}, ("ffn",), 2)
    spec = get_spec("cosmos-tiny")  # its adaLN-LoRA down projections are 32 -> 8
    with pytest.raises(ValueError, match="exceeds min"):
        module = random_model(spec.with_blocks(1), torch.float32)
        adapt_module(module, spec.lora_targets, LoraConfig(9, None, ("modulation",)))


def test_a_bad_adapter_set_is_named_by_merge():
    W = {"a.weight": torch.ones(3, 4)}
    with pytest.raises(ValueError, match="lacks its .lora_up"):
        merge(W, {"a.weight.lora_down": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="no such weight"):
        merge(W, {"b.weight.lora_down": torch.ones(2, 4), "b.weight.lora_up": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="does not fit the weight"):
        merge(W, {"a.weight.lora_down": torch.ones(2, 5), "a.weight.lora_up": torch.ones(3, 2)})


def saved_bytes(fn, params: dict) -> int:
    """Bytes of the distinct new storages autograd saves for the backward of fn() (parameters' own
    storages, which the frozen weights share in both paths, not counted)."""
    own = {p.untyped_storage().data_ptr() for p in params.values()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_the_low_rank_path_saves_no_merged_weight_for_the_backward():
    """The memory claim of rcmfn/lora_linear.py, counted: merging W + delta inside the step makes autograd
    keep a full-size merged copy of each adapted weight whose input carries gradient (every o and FFN
    weight here; not the cross-attention k, v of the frozen text, nor block 0's q, k, v, which see no
    trained input yet) until the backward; the low-rank path keeps none."""
    cfg = LoraConfig(rank=2, targets=("attention", "ffn"))
    plain, lora, weights, adapters, x, cond = adapted("wan-tiny", cfg)
    adapters = adapters.apply(lambda t: t.requires_grad_(True))
    low_rank = saved_bytes(lambda: lora(adapters, x, T, cond), weights | dict(adapters.items()))
    merged = saved_bytes(lambda: plain(merge(weights, adapters), x, T, cond), weights | dict(adapters.items()))
    always_saved = sum(weights[k].nbytes for k in adapter_pairs(adapters) if ".ffn." in k or k.endswith(".o.weight"))
    assert merged - low_rank >= 0.9 * always_saved > 0


def test_compiled_adapted_forward_and_tangent_match_eager():
    """The adapted net under torch.compile(fullgraph=True) as the toy's --compile runs it: forward and jvp."""
    from rcmfn.compile import compiled

    _, lora, weights, adapters, x, cond = adapted("toy", LoraConfig(rank=2, targets=("attention", "ffn", "modulation")))
    velocity = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tangent = lambda p, x_t, t, c, f: scm_tangent(lora, p, x_t, t, c, f)  # noqa: E731
    torch.testing.assert_close(compiled(lora)(adapters, x, T, cond), lora(adapters, x, T, cond), rtol=1e-12, atol=1e-12)
    got, want = compiled(tangent)(adapters, x, T, cond, velocity), tangent(adapters, x, T, cond, velocity)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
