"""The method table: every registered method against every invariant, plus method-specific math."""

import pytest
import torch
from conftest import tiny_vit
from torch import nn

import avl_peft
from avl_peft.adapters import AdaptedLinear
from avl_peft.adapters.inject import adapted_layers
from avl_peft.adapters.loretta import tt_shape

R = 4
# Tiny ViT (embed 192, depth 2): (d_out, d_in) of qkv, proj, fc1, fc2 in each block.
LAYERS = [(576, 192), (192, 192), (768, 192), (192, 768)]
HEAD = 192 * 10 + 10


def tt_count(n: int, t: int) -> int:
    shape = tt_shape(n)
    assert int(torch.tensor(shape).prod()) == n
    ranks = [1] + [t] * (len(shape) - 1) + [1]
    return sum(ranks[i] * m * ranks[i + 1] for i, m in enumerate(shape))


# method -> (inject options, closed-form trainable count on the depth-2 tiny ViT)
TABLE = {
    "lora": ({"rank": R}, 2 * sum(R * (o + i) for o, i in LAYERS) + HEAD),
    "pissa": ({"rank": R}, 2 * sum(R * (o + i) for o, i in LAYERS) + HEAD),
    # shared: one (φ, ψ) per target type, 2·d_in·r each, independent of depth
    "wegeft": ({"rank": R}, sum(2 * i * R for o, i in LAYERS) + HEAD),
    "loretta": ({"rank": R, "tt_rank": 3}, 2 * sum(tt_count(R * i, 3) + tt_count(o * R, 3) for o, i in LAYERS) + HEAD),
    "inflora": ({"rank": R}, 2 * sum(R * o for o, i in LAYERS) + HEAD),  # A is a designed, frozen buffer: only B trains
    "sdlora": ({"rank": R}, 2 * sum(R * (o + i) + 1 for o, i in LAYERS) + HEAD),  # LoRA factors + one magnitude
    # depth 2: block 0 task-shared (A, B), block 1 task-specific (A, B, one block weight per q/k/v chunk of qkv, 1 else)
    "cl_lora": ({"rank": R}, 2 * sum(R * (o + i) for o, i in LAYERS) + 3 + 1 + 1 + 1 + HEAD),
    "full": ({}, None),  # every parameter
    "head": ({}, HEAD),
}
ADAPTERS = [m for m in TABLE if m not in ("full", "head")]


def test_every_registered_method_has_a_row():
    assert set(avl_peft.methods()) == set(TABLE), "add a row to TABLE for every registered method"


def randomise(model):
    """Move adapter weights off their init so ΔW ≠ 0 and every path carries signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for p in layer.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def injected(method, depth=2, **extra):
    model = tiny_vit(depth)
    opts, _ = TABLE[method]
    return avl_peft.inject(model, method, **{**opts, **extra})


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method", TABLE)
def test_injection_leaves_outputs_unchanged(method):
    ref = tiny_vit()(X)
    out = injected(method)(X)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ADAPTERS)
def test_fast_forward_equals_dense_delta(method):
    model = injected(method)
    randomise(model)
    deltas = avl_peft.delta_weights(model)
    assert set(deltas) == set(adapted_layers(model))
    for name, layer in adapted_layers(model).items():
        w, b = layer.base.weight, layer.base.bias
        assert deltas[name].shape == w.shape
        x = torch.randn(5, 7, w.shape[1])
        dense = (x.double() @ w.double().t() + x.double() @ deltas[name].double().t() + b.double()).float()
        fast = layer(x)
        rel = (fast - dense).norm() / dense.norm()
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e}"
        assert deltas[name].norm() > 0, f"{name}: randomised ΔW should not be zero"


@pytest.mark.parametrize("method", ADAPTERS)
def test_merge_preserves_outputs(method):
    model = injected(method)
    randomise(model)
    before = model(X)
    avl_peft.merge(model)
    assert not adapted_layers(model)
    assert (model(X) - before).abs().max().item() <= 1e-4
    assert model.avl_peft_injection is None
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head"))


@pytest.mark.parametrize("method", TABLE)
def test_only_expected_parameters_train(method):
    model = injected(method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
        return
    expected = {n for n, _ in model.named_parameters() if n.startswith("head.") or ".adapter." in n}
    assert trainable == expected
    assert {"head.weight", "head.bias"} <= trainable


@pytest.mark.parametrize("method", TABLE)
def test_trainable_count_matches_closed_form(method):
    model = injected(method)
    counts = avl_peft.parameter_counts(model)
    expected = TABLE[method][1]
    if expected is None:
        expected = sum(p.numel() for p in tiny_vit().parameters())
    assert counts["trainable"] == expected
    assert counts["total"] == sum(p.numel() for p in tiny_vit().parameters()) + counts["adapter"]


@pytest.mark.parametrize("method", ADAPTERS)
def test_gradients_reach_every_adapter_parameter(method):
    model = injected(method)
    randomise(model)
    model.train()
    nn.functional.cross_entropy(model(X), torch.tensor([0, 1, 2])).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert p.grad is None


@pytest.mark.parametrize("method", TABLE)
def test_adapter_state_dict_round_trips(method):
    model = injected(method)
    randomise(model)
    with torch.no_grad():
        model.head.weight.add_(0.5)
    state = avl_peft.trainable_state_dict(model)
    fresh = injected(method)
    fresh.load_state_dict(state, strict=False)
    assert torch.allclose(fresh(X), model(X), atol=1e-6)


# --- method-specific math ------------------------------------------------------------------------


def test_pissa_starts_at_best_rank_r_approximation():
    model = injected("pissa")
    for layer in adapted_layers(model).values():
        a = layer.adapter
        w = layer.base.weight
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        best = u[:, :R] * s[:R] @ vh[:R]
        principal = a.scale * a.lora_B @ a.lora_A
        assert torch.allclose(principal, best, atol=1e-5)
        assert torch.allclose(a.lora_A, a.A0) and torch.allclose(a.lora_B, a.B0)


def test_pissa_randomized_svd_is_close():
    # Pretrained weights have decaying spectra (random init does not): build one.
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(576, 192, generator=g))
    v, _ = torch.linalg.qr(torch.randn(192, 192, generator=g))
    w = u * (0.8 ** torch.arange(192.0)) @ v.t()
    fcs = []
    for niter in (None, 4):
        m = nn.Sequential()
        m.add_module("fc", nn.Linear(192, 576))
        m.fc.weight.data.copy_(w)
        avl_peft.inject(m, "pissa", targets=["fc"], rank=8, svd_niter=niter)
        fcs.append(m.fc.adapter)
    pe, pa = (a.lora_B @ a.lora_A for a in fcs)
    assert (pe - pa).norm() / pe.norm() < 1e-3


def test_wegeft_shared_count_does_not_grow_with_depth():
    shallow = avl_peft.parameter_counts(injected("wegeft", depth=2))["adapter"]
    deep = avl_peft.parameter_counts(injected("wegeft", depth=4))["adapter"]
    assert shallow == deep == sum(2 * i * R for _, i in LAYERS)
    unshared = avl_peft.parameter_counts(injected("wegeft", depth=4, share=False))["adapter"]
    assert unshared == 4 * sum(2 * i * R for _, i in LAYERS)


def test_wegeft_update_lies_in_column_space_of_w():
    model = injected("wegeft")
    randomise(model)
    for name, layer in adapted_layers(model).items():
        w = layer.base.weight.double()
        delta = avl_peft.delta_weights(model)[name].double()
        u, s, _ = torch.linalg.svd(w, full_matrices=False)
        u = u[:, s > s[0] * 1e-10]
        residual = delta - u @ (u.t() @ delta)
        assert residual.norm() / delta.norm() < 1e-5, name  # float32 ΔW; a generic update gives ~0.8


def test_loretta_any_size_and_reference_count():
    for n in (192, 576, 768, 2304, 3072, 1009, 2 * 1009):
        shape = tt_shape(8 * n)
        assert int(torch.tensor(shape).prod()) == 8 * n
    # The LoRETTA paper's reference: one 768×768 matrix at r=8, t=5 costs ≈ 1,160 parameters (8·8·12·8 for each factor).
    layer = nn.Linear(768, 768)
    model = nn.Sequential()
    model.add_module("blk", nn.Module())
    model.blk.fc = layer
    avl_peft.inject(model, "loretta", targets=["blk.fc"], rank=8, tt_rank=5)
    assert avl_peft.parameter_counts(model)["adapter"] == 1160
    # A ViT-B-sized MLP (3072) and a prime-sized layer both work end to end.
    for d_out, d_in in ((3072, 768), (1009, 64)):
        m = nn.Sequential()
        m.add_module("fc", nn.Linear(d_in, d_out))
        avl_peft.inject(m, "loretta", targets=["fc"], rank=4, tt_rank=2)
        randomise(m)
        x = torch.randn(2, d_in)
        assert torch.allclose(
            m(x), nn.functional.linear(x, m.fc.base.weight + m.fc.delta_weight(), m.fc.base.bias), atol=1e-5
        )


def test_loretta_fast_contraction_equals_tensorly():
    model = injected("loretta")
    randomise(model)
    for layer in adapted_layers(model).values():
        for tt in (layer.adapter.tt_A, layer.adapter.tt_B):
            assert torch.allclose(tt.fast_matrix(), tt.matrix(), rtol=1e-5, atol=1e-7)


def test_loretta_init_std_and_reference_init():
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(768, 768))
    avl_peft.inject(m, "loretta", targets=["fc"], rank=8, tt_rank=5)
    a = m.fc.adapter.tt_A.matrix()
    target = (1 / (768 + 768)) ** 0.5
    assert 0.5 * target < a.std().item() < 2 * target
    assert m.fc.adapter.tt_B.matrix().abs().max() == 0
    ref = nn.Sequential()
    ref.add_module("fc", nn.Linear(768, 768))
    avl_peft.inject(ref, "loretta", targets=["fc"], rank=8, tt_rank=5, init="reference")
    assert ref.fc.delta_weight().abs().max() > 0


# --- agreement with HF peft ----------------------------------------------------------------------

PEFT_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_matches_hf_peft(method):
    peft = pytest.importorskip("peft")
    ours = injected(method)
    randomise(ours)
    config = peft.LoraConfig(
        r=R, lora_alpha=R, target_modules=PEFT_TARGETS, init_lora_weights=True if method == "lora" else "pissa"
    )
    theirs = peft.get_peft_model(tiny_vit(), config)
    with torch.no_grad():
        for name, layer in adapted_layers(ours).items():
            mod = theirs.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(layer.adapter.lora_A)
            mod.lora_B["default"].weight.copy_(layer.adapter.lora_B)
    theirs.eval()
    assert torch.allclose(ours(X), theirs(X), atol=1e-4)


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_method_lists_and_suggests():
    with pytest.raises(avl_peft.ConfigError, match=r"lora.*Did you mean 'lora'"):
        avl_peft.inject(tiny_vit(), "loraa")


def test_targets_matching_nothing():
    with pytest.raises(avl_peft.ConfigError, match="matches no nn.Linear"):
        avl_peft.inject(tiny_vit(), "lora", targets=["attn.qkvv"])


def test_non_linear_target_names_the_module():
    with pytest.raises(avl_peft.ConfigError, match=r"patch_embed\.proj.*Conv2d"):
        avl_peft.inject(tiny_vit(), "lora", targets=["proj"])


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank(rank):
    with pytest.raises(avl_peft.ConfigError, match="rank"):
        avl_peft.inject(tiny_vit(), "lora", rank=rank)


def test_rank_too_large_names_layer():
    with pytest.raises(avl_peft.ConfigError, match=r"blocks\.0\.attn\.qkv.*576×192"):
        avl_peft.inject(tiny_vit(), "pissa", rank=193)


def test_inject_twice():
    model = avl_peft.inject(tiny_vit(), "lora")
    with pytest.raises(avl_peft.ConfigError, match="already has 'lora'"):
        avl_peft.inject(model, "wegeft")


def test_unknown_option_suggests():
    with pytest.raises(avl_peft.ConfigError, match="Did you mean 'tt_rank'"):
        avl_peft.inject(tiny_vit(), "loretta", ttrank=4)


def test_regex_targets_and_head_protection():
    model = avl_peft.inject(tiny_vit(), "lora", targets=[r"blocks\.0\.attn\.qkv"], rank=2)
    assert list(adapted_layers(model)) == ["blocks.0.attn.qkv"]
    assert isinstance(model.blocks[0].attn.qkv, AdaptedLinear)
    with pytest.raises(avl_peft.ConfigError, match="classifier head"):
        avl_peft.inject(tiny_vit(), "lora", targets=["head"])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("separate_input", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("path", ["merged", "split"])
def test_fused_low_rank_backward_is_exact(bias, separate_input, frozen, path, monkeypatch):
    from avl_peft.adapters import _lowrank
    from avl_peft.adapters._lowrank import low_rank_linear

    monkeypatch.setattr(_lowrank, "FORCE_PATH", path)
    g = torch.Generator().manual_seed(5)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x, w, a, b = t(2, 3, 6), t(5, 6), t(2, 6), t(5, 2)
    bias_t = t(5) if bias else None
    x_l = t(2, 3, 6) if separate_input else None
    pair = (t(5, 3), t(3, 6)) if frozen else None  # earlier branches / PiSSA's −s·B₀A₀: L₀ (d_out, q₀), R₀

    def fn(x, w, bias_t, a, b, x_l, left=None, right=None):
        return low_rank_linear(x, w, bias_t, a, b, 0.7, x_l, (left, right) if left is not None else None)

    inputs = (x, w, bias_t, a, b, x_l, *(pair or ()))
    assert torch.autograd.gradcheck(fn, inputs)
    ref = torch.nn.functional.linear(x, w, bias_t) + 0.7 * ((x if x_l is None else x_l) @ a.t()) @ b.t()
    if frozen:
        ref = ref + (x @ pair[1].t()) @ pair[0].t()
    assert torch.allclose(fn(*inputs), ref)
    with torch.no_grad():  # evaluation: nothing kept for a backward, the same output
        assert torch.allclose(fn(*inputs), ref)
    # Frozen W, A and frozen term (InfLoRA's second experience): gradients only for B and x, the same ones.
    detached = (x, w.detach(), bias_t, a.detach(), b, x_l, *(p.detach() for p in pair or ()))
    assert torch.autograd.gradcheck(fn, detached)


def test_merged_path_is_chosen_by_token_count():
    from avl_peft.adapters._lowrank import use_merged

    # ViT-Tiny's qkv (576 × 192): merging pays from 256 tokens on; ViT-B's fc1 (3072 × 768) from 1,118.
    assert not use_merged(255, 576, 192) and use_merged(256, 576, 192)
    assert not use_merged(1117, 3072, 768) and use_merged(1118, 3072, 768)
