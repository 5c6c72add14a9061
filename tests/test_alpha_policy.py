"""alpha_policy: how the update's scale s follows the rank (rank: s = 1, constant: α/r, rslora: α/√r)."""

import functools
import math

import pytest
import torch
from conftest import tiny_vit

import avl_peft
from avl_peft.adapters.base import AdapterOptions
from avl_peft.adapters.inject import adapted_layers

R, ALPHA = 4, 8.0
SCALES = {  # policy -> (options, the scale its definition gives at rank R)
    "default": ({}, 1.0),  # today's behaviour without alpha: α = r
    "default+alpha": ({"alpha": ALPHA}, ALPHA / R),  # today's behaviour with alpha: constant α
    "rank": ({"alpha_policy": "rank"}, 1.0),
    "constant": ({"alpha_policy": "constant", "alpha": ALPHA}, ALPHA / R),
    "rslora": ({"alpha_policy": "rslora", "alpha": ALPHA}, ALPHA / math.sqrt(R)),
}


@pytest.mark.parametrize("rank", [1, 4, 16, 64])
def test_scale_follows_its_definition_at_every_rank(rank):
    assert AdapterOptions(rank=rank).scale == 1.0
    assert AdapterOptions(rank=rank, alpha_policy="rank").scale == 1.0
    assert AdapterOptions(rank=rank, alpha=16, alpha_policy="constant").scale == 16 / rank
    assert AdapterOptions(rank=rank, alpha=16, alpha_policy="rslora").scale == 16 / math.sqrt(rank)
    assert AdapterOptions(rank=rank, alpha=16).scaling() == {
        "alpha_policy": "constant",
        "alpha": 16,
        "scale": 16 / rank,
    }
    assert AdapterOptions(rank=rank).scaling() == {"alpha_policy": "rank", "alpha": rank, "scale": 1.0}


def _deltas(method, options):
    torch.manual_seed(0)
    model = avl_peft.inject(tiny_vit(1), method, rank=R, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same trained-like factors under every policy (state, not the scale)
        for layer in adapted_layers(model).values():
            for p in layer.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            for name, b in layer.adapter.named_buffers():
                if b.is_floating_point() and name != "basis":
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model, avl_peft.delta_weights(model)


@functools.cache
def _unit(method):
    return _deltas(method, {})[1]


# Every policy on LoRA; the two that change the scale on the other factorisations (PiSSA's init depends on s).
CASES = [("lora", p) for p in SCALES] + [(m, p) for m in ("pissa", "wegeft", "loretta") for p in ("constant", "rslora")]


@pytest.mark.parametrize(("method", "policy"), CASES)
def test_update_is_exactly_scale_times_the_unscaled_product(method, policy):
    # ΔW under each policy equals s × ΔW at s = 1 for the same factors: the policy changes the step size only.
    options, scale = SCALES[policy]
    model, deltas = _deltas(method, options)
    unit = _unit(method)
    for name, delta in deltas.items():
        torch.testing.assert_close(delta, scale * unit[name], rtol=1e-6, atol=1e-7)
    # and the fast forward pass computes W + ΔW with that scale
    layer = next(iter(adapted_layers(model).values()))
    x = torch.randn(3, layer.in_features)
    expected = torch.nn.functional.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_policies_are_refused_with_the_fix():
    with pytest.raises(avl_peft.ConfigError, match="alpha_policy must be one of rank, constant, rslora.*rslora"):
        AdapterOptions(alpha_policy="rsLora", alpha=8)
    with pytest.raises(avl_peft.ConfigError, match="needs alpha"):
        AdapterOptions(alpha_policy="rslora")
    with pytest.raises(avl_peft.ConfigError, match="drop alpha"):
        AdapterOptions(alpha_policy="rank", alpha=8)
