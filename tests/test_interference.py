"""policy: stack, interference control (orthogonal / project) for every method, InfLoRA and SD-LoRA."""

from collections import OrderedDict

import pytest
import torch
from conftest import tiny_vit
from torch import nn
from torch.nn import functional as F

import avl_peft
from avl_peft.adapters import (
    adapter_state_dict,
    begin_experience,
    collect_inputs,
    end_experience,
    gpm_update,
    interference_penalty,
    load_adapter_state,
    needs_inputs,
    orthogonal_penalty,
    stack,
)
from avl_peft.adapters.stack import adapted_layers

METHODS = ["lora", "pissa", "wegeft", "loretta", "inflora", "sdlora"]
EXTRA = {"loretta": {"tt_rank": 2}}
TARGETS = ["fc1", "fc2"]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = OrderedDict(fc1=nn.Linear(12, 16), act=nn.Tanh(), fc2=nn.Linear(16, 8), head=nn.Linear(8, 3))
    return nn.Sequential(layers).eval()


def adapted_mlp(method: str, **options) -> nn.Module:
    return avl_peft.inject(mlp(), method, targets=TARGETS, rank=2, **{**EXTRA.get(method, {}), **options})


def data(seed: int, n: int = 64, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, 12, generator=g)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, 12, generator=g)  # a rank-`rank` input set


def train(model: nn.Module, x: torch.Tensor, steps: int = 15, lr: float = 0.02, seed: int = 0) -> None:
    """A few Adam steps towards random targets (plus the interference penalty): every factor moves, ΔW grows."""
    target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        (F.mse_loss(model(x), target) + interference_penalty(model)).backward()
        opt.step()
    model.eval()


def experience(model: nn.Module, x: torch.Tensor, first: bool, seed: int = 0) -> None:
    """What the plugin does for one experience under policy: stack."""
    if not first:
        stack(model)
    begin_experience(model, collect_inputs(model, [x]) if needs_inputs(model) else None)
    train(model, x, seed=seed)
    end_experience(model, collect_inputs(model, [x]) if needs_inputs(model) else None)


def randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for p in layer.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- stack: every method -------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_stack_keeps_outputs_freezes_old_branches_and_merges(method):
    model = avl_peft.inject(tiny_vit(1), method, rank=2, **EXTRA.get(method, {}))
    randomise(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    before = model(x)
    assert stack(model) == 1
    assert rel(model(x), before) <= 1e-6, "stacking must not change outputs"
    old = {k: v.clone() for k, v in adapter_state_dict(model).items() if ".folded." in k}
    assert old
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("head.") or ".adapter." in n}
    if method == "sdlora":  # earlier magnitudes keep learning
        expected |= {n for n, _ in model.named_parameters() if n.endswith(".folded.magnitudes")}
    assert trainable == expected
    randomise(model, seed=2)  # the new branch moves; the frozen ones must not
    train(model, x, steps=2, lr=0.05)
    for k, v in adapter_state_dict(model).items():
        if k in old and "magnitude" not in k:
            assert torch.equal(v, old[k]), f"frozen {k} changed"
    for name, layer in adapted_layers(model).items():  # fast path with frozen branches == dense sum
        w, b = layer.base.weight.double(), layer.base.bias.double()
        xi = torch.randn(4, 5, w.shape[1])
        dense = (xi.double() @ (w + layer.delta_weight().double()).t() + b).float()
        assert rel(layer(xi), dense) <= 1e-5, name
    out = model(x)
    avl_peft.merge(model)
    assert not adapted_layers(model)
    assert rel(model(x), out) <= 1e-5, "merge must fold every branch"


def test_stack_gives_wegeft_fresh_shared_generators():
    model = avl_peft.inject(tiny_vit(2), "wegeft", rank=2)
    old = model.blocks[0].mlp.fc1.adapter.gen
    stack(model)
    fc1 = [model.blocks[i].mlp.fc1 for i in range(2)]
    assert fc1[0].adapter.gen is fc1[1].adapter.gen  # still shared per target type
    assert fc1[0].adapter.gen is not old  # a fresh generator; the old one is folded away
    assert not any(p.requires_grad for p in old.parameters())
    unshared = avl_peft.inject(tiny_vit(2), "wegeft", rank=2, share=False)
    stack(unshared)
    assert unshared.blocks[0].mlp.fc1.adapter.gen is not unshared.blocks[1].mlp.fc1.adapter.gen


# --- project (GPM confinement) -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_project_keeps_outputs_on_the_kept_subspace(method):
    model = adapted_mlp(method, interference="project")
    x0, x1 = data(0, rank=3), data(1)
    experience(model, x0, first=True)
    layers = adapted_layers(model)
    kept = {}
    for name, x in collect_inputs(model, [x0]).items():
        m = layers[name].memory
        assert 0 < m.shape[1] < m.shape[0], f"{name}: GPM should keep a proper subspace, got k={m.shape[1]}"
        assert torch.allclose(m.t() @ m, torch.eye(m.shape[1]), atol=1e-5)
        xs = (x @ m) @ m.t()  # experience-0 inputs, projected into the kept subspace
        kept[name] = (xs, layers[name](xs).detach())
    experience(model, x1, first=False, seed=1)
    for name, layer in adapted_layers(model).items():
        xs, out0 = kept[name]
        current = layer.adapter.delta_weight(layer.base.weight)
        assert current.norm() > 1e-2 * layer.base.weight.norm(), f"{name}: the new branch barely trained"
        assert (current @ layer.adapter.basis).norm() <= 1e-5 * current.norm(), f"{name}: ΔW_t reads span(M)"
        if method != "sdlora":  # SD-LoRA's earlier magnitudes move by design
            assert rel(layer(xs), out0) <= 1e-4, f"{name}: output on old inputs changed"


def test_project_on_a_vit_layer_with_tokens():
    model = avl_peft.inject(tiny_vit(1), "lora", rank=2, targets=["attn.qkv"], interference="project")
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    experience(model, x0, first=True)
    inputs = collect_inputs(model, [x0], max_samples=100)
    assert inputs["blocks.0.attn.qkv"].shape == (100, 192)  # 2 images × 65 tokens, subsampled
    layer = model.blocks[0].attn.qkv
    xs = (inputs["blocks.0.attn.qkv"] @ layer.memory) @ layer.memory.t()
    out0 = layer(xs).detach()
    experience(model, x1, first=False, seed=1)
    assert layer.adapter.delta_weight(layer.base.weight).norm() > 0
    assert rel(layer(xs), out0) <= 1e-4


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("method", METHODS)
def test_confined_fast_path_equals_dense_and_vanishes_on_the_basis(method, dropout):
    model = adapted_mlp(method, interference="project", dropout=dropout).eval()  # new Dropout modules train
    randomise(model)
    g = torch.Generator().manual_seed(7)
    for layer in adapted_layers(model).values():
        d_in = layer.base.in_features
        layer.adapter.basis = torch.linalg.qr(torch.randn(d_in, 3, generator=g)).Q
        delta = layer.delta_weight()
        assert (delta @ layer.adapter.basis).norm() <= 1e-6 * delta.norm()
        left, right = layer.adapter.factors(layer.base.weight)
        assert rel(left @ right, delta) <= 1e-5
        x = torch.randn(6, d_in, generator=g)
        dense = F.linear(x.double(), (layer.base.weight + delta).double(), layer.base.bias.double()).float()
        assert rel(layer(x), dense) <= 1e-5  # eval mode: the dropout path runs with dropout off


def test_project_needs_a_new_branch_per_experience():
    model = adapted_mlp("lora", interference="project")
    experience(model, data(0), first=True)
    with pytest.raises(avl_peft.ConfigError, match="policy: stack"):
        begin_experience(model, collect_inputs(model, [data(1)]))


def test_gpm_update_known_answer():
    q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(5))).Q
    z = torch.randn(200, 3, generator=torch.Generator().manual_seed(6)) * torch.tensor([10.0, 3.0, 1.0])
    x = z @ q[:, :3].t()  # energy ≈ 100 : 9 : 1 along q0, q1, q2
    empty = torch.empty(8, 0)
    top = gpm_update(empty, x, 0.8)
    assert top.shape == (8, 1) and abs(abs(top[:, 0] @ q[:, 0]) - 1) < 1e-2
    full = gpm_update(empty, x, 1.0)
    assert full.shape == (8, 3)
    assert torch.allclose(full @ full.t(), q[:, :3] @ q[:, :3].t(), atol=1e-5)  # exactly the input subspace
    assert gpm_update(full, x, 1.0).shape == (8, 3)  # nothing new to add
    more = gpm_update(full, torch.randn(50, 1) @ q[:, 5:6].t(), 0.97)  # a new orthogonal direction
    assert more.shape == (8, 4) and torch.allclose(more.t() @ more, torch.eye(4), atol=1e-5)
    assert abs(abs(more[:, 3] @ q[:, 5]) - 1) < 1e-5


def test_collect_inputs_is_deterministic_and_restores_mode():
    model = adapted_mlp("lora")
    model.train()
    batches = [data(0, n=40), (data(1, n=40), torch.zeros(40))]  # bare tensors or (x, y) tuples
    a, b = collect_inputs(model, batches, max_samples=50), collect_inputs(model, batches, max_samples=50)
    assert model.training
    assert a["fc1"].shape == (50, 12) and a["fc2"].shape == (50, 16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = torch.cat([data(0, n=40), data(1, n=40)])
    assert all(any(torch.equal(r, s) for s in rows) for r in a["fc1"])  # real rows, no duplicates invented
    assert len({tuple(r.tolist()) for r in a["fc1"]}) == 50


# --- orthogonal (O-LoRA) -------------------------------------------------------------------------


def test_orthogonal_penalty_zero_positive_and_exact_gradient():
    q = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64)).Q
    assert orthogonal_penalty(q[:, :3].t(), q[:, 3:6].t()) <= 1e-24
    old = torch.randn(3, 10, dtype=torch.float64)
    cur = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    assert orthogonal_penalty(old, cur) > 0
    assert torch.autograd.gradcheck(lambda c: orthogonal_penalty(old, c), (cur,))


def test_model_penalty_accepts_lambda_and_matches_closed_form():
    model = avl_peft.inject(mlp(), "lora", targets=TARGETS, rank=2, interference="orthogonal", **{"lambda": 0.1})
    assert model.fc1.adapter.opts.orth_lambda == 0.1
    assert interference_penalty(model) == 0  # nothing frozen yet
    olds = {lay: lay.adapter.lora_A.detach().clone() for lay in (model.fc1, model.fc2)}
    stack(model)
    expected = sum(0.1 * (old @ lay.adapter.lora_A.t()).pow(2).sum() for lay, old in olds.items())
    assert torch.allclose(interference_penalty(model), expected)
    model.double()
    layer = model.fc1

    def penalty(a: torch.Tensor) -> torch.Tensor:
        layer.adapter.input_factor = lambda: a  # the model-level sum, differentiated in the current factor
        return interference_penalty(model)

    a = layer.adapter.lora_A.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(penalty, (a,))
    with torch.no_grad():  # rows orthogonal to the frozen branch's rows: no penalty from this layer
        old = olds[model.fc1].double()
        basis = torch.linalg.qr(old.t()).Q  # (12, 2)
        free = a - (a @ basis) @ basis.t()
    assert penalty(free) - penalty(torch.zeros_like(a)) <= 1e-20
    del layer.adapter.input_factor


@pytest.mark.parametrize("method", METHODS)
def test_orthogonal_penalty_for_every_method(method):
    model = adapted_mlp(method, interference="orthogonal")
    randomise(model)
    stack(model)
    randomise(model, seed=2)
    p = interference_penalty(model)
    assert p > 0
    if p.requires_grad:  # InfLoRA's A is designed and fixed: its penalty is a constant
        p.backward()
        grads = [q.grad for q in model.fc1.adapter.parameters() if q.requires_grad and q.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


def test_shared_wegeft_factor_counts_once():
    model = avl_peft.inject(tiny_vit(2), "wegeft", rank=2, targets=["mlp.fc1"], interference="orthogonal")
    randomise(model)
    old = model.blocks[0].mlp.fc1.adapter.gen.psi.detach().clone()
    stack(model)
    randomise(model, seed=2)
    layer = model.blocks[0].mlp.fc1
    once = 0.5 * orthogonal_penalty(old, layer.adapter.gen.psi)
    assert torch.allclose(interference_penalty(model), once)


# --- InfLoRA and SD-LoRA -------------------------------------------------------------------------


def test_inflora_designs_a_outside_the_old_subspace_and_trains_only_b():
    model = adapted_mlp("inflora")
    with pytest.raises(avl_peft.ConfigError, match="collect_inputs"):
        begin_experience(model, None)
    x0 = data(0, rank=3)
    experience(model, x0, first=True)
    a0 = model.fc1.adapter.lora_A
    assert torch.allclose(a0 @ a0.t(), torch.eye(2) / 3, atol=1e-6)  # orthonormal rows, scaled 1/√3
    kept = {n: collect_inputs(model, [x0])[n] for n in ("fc1", "fc2")}
    kept = {n: (x @ adapted_layers(model)[n].memory) @ adapted_layers(model)[n].memory.t() for n, x in kept.items()}
    out0 = {n: adapted_layers(model)[n](x).detach() for n, x in kept.items()}
    stack(model)
    begin_experience(model, collect_inputs(model, [data(1)]))
    designed = {n: (lay.adapter.lora_A.clone(), lay.adapter.lora_B.clone()) for n, lay in adapted_layers(model).items()}
    for layer in adapted_layers(model).values():
        assert (layer.adapter.lora_A @ layer.memory).abs().max() <= 1e-5
        assert not layer.adapter.lora_A.requires_grad
    train(model, data(1), seed=1)
    for n, layer in adapted_layers(model).items():
        assert torch.equal(layer.adapter.lora_A, designed[n][0]), "A must stay fixed"
        assert not torch.equal(layer.adapter.lora_B, designed[n][1]), "B must train"
        assert rel(layer(kept[n]), out0[n]) <= 1e-4


def test_inflora_design_with_few_samples_and_a_full_memory():
    from avl_peft.adapters.interference import design_input_factor

    memory = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(8))).Q
    rows = design_input_factor(torch.randn(1, 6), memory, rank=2)  # one sample: one direction, one random
    assert torch.allclose(rows @ rows.t(), torch.eye(2), atol=1e-6) and (rows @ memory).abs().max() <= 1e-6
    full = torch.linalg.qr(torch.randn(6, 5, generator=torch.Generator().manual_seed(9))).Q
    with pytest.warns(UserWarning, match="only 1 input directions"):
        rows = design_input_factor(torch.randn(10, 6), full, rank=2)
    assert rows[1].abs().max() == 0 and (rows @ full).abs().max() <= 1e-6


def test_sdlora_directions_frozen_magnitudes_learn():
    model = adapted_mlp("sdlora")
    x0, x1 = data(0), data(1)
    experience(model, x0, first=True)
    before = model(x0)
    old = model.fc1.adapter
    stack(model)
    assert (model(x0) - before).abs().max() <= 1e-5
    a, b, alpha = old.lora_A.clone(), old.lora_B.clone(), old.magnitude.item()
    assert torch.allclose(old.direction_norm, torch.linalg.matrix_norm(b @ a))
    assert abs(alpha - torch.linalg.matrix_norm(model.fc1.delta_weight()).item()) <= 1e-4 * abs(alpha)
    folded = model.fc1.folded
    assert folded.magnitudes.requires_grad and folded.magnitudes.item() == alpha
    directions = folded.dir_left.clone(), folded.dir_right.clone()
    experience(model, x1, first=False, seed=1)  # stacks again: an untrained branch (α = 0) joins, then trains
    assert torch.equal(folded.dir_left[:, :2], directions[0]) and torch.equal(folded.dir_right[:2], directions[1])
    assert folded.magnitudes[0].item() != alpha
    direction = b @ a / torch.linalg.matrix_norm(b @ a)
    assert torch.allclose(folded.delta_weight(), folded.magnitudes[0] * direction, atol=1e-6)


# --- checkpoints, budgets, options ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options"),
    [("lora", {"interference": "project"}), ("pissa", {}), ("wegeft", {}), ("inflora", {}), ("sdlora", {})],
)
def test_adapter_state_round_trips_through_a_fresh_model(method, options):
    model = adapted_mlp(method, **options)
    for t in range(3):
        experience(model, data(t, rank=3), first=t == 0, seed=t)
    state = adapter_state_dict(model)
    head = {f"head.{k}": v for k, v in model.head.state_dict().items()}  # a checkpoint also holds the head
    fresh = load_adapter_state(adapted_mlp(method, **options), {**state, **head})
    x = data(9)
    assert torch.equal(fresh(x), model(x))
    assert all(lay.frozen_count() == 2 for lay in adapted_layers(fresh).values())
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    stack(fresh)  # now one branch more than the saved state
    with pytest.raises(avl_peft.ConfigError, match="only 2"):
        load_adapter_state(fresh, state)


@pytest.mark.parametrize("method", ["inflora", "sdlora"])
def test_budget_counts_the_new_methods(method):
    from avl_peft.adapters.budget import count_adapter_params

    model = tiny_vit(2)
    expected = avl_peft.parameter_counts(avl_peft.inject(tiny_vit(2), method, rank=3))["adapter"]
    assert count_adapter_params(method, backbone_model=model, rank=3) == expected


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"interference": "orthogonl"}, r"interference must be one of none, orthogonal, project.*'orthogonal'"),
        ({"lambda": -0.1}, "lambda"),
        ({"orth_lambda": float("nan")}, "lambda"),
        ({"gpm_threshold": 0}, r"gpm_threshold must be a number in \(0, 1\]"),
        ({"gpm_threshold": 1.5}, "gpm_threshold"),
        ({"lambda": 0.1, "orth_lambda": 0.2}, "not both"),
        ({"lamda": 0.1}, "Did you mean 'lambda'"),
    ],
)
def test_bad_interference_options(options, match):
    with pytest.raises(avl_peft.ConfigError, match=match):
        avl_peft.inject(mlp(), "lora", targets=TARGETS, **options)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("interference", ["none", "project"])
def test_fused_paths_agree_on_stacked_layers(method, interference, monkeypatch):
    """The fused node's two paths on a layer with a frozen branch (one GEMM with W + L₀R₀ + ΔW, or the
    separate thin products): the same outputs and the same gradients for every trainable parameter."""
    from avl_peft.adapters import _lowrank

    model = adapted_mlp(method, interference=interference)
    experience(model, data(0, rank=3), first=True)  # low-rank inputs: the kept subspace leaves room to learn
    experience(model, data(1, rank=3), first=False, seed=1)
    model.train()
    x = data(2)
    results = {}
    for path in ("merged", "split"):
        monkeypatch.setattr(_lowrank, "FORCE_PATH", path)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[path] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (out_m, grads_m), (out_s, grads_s) = results["merged"], results["split"]
    assert rel(out_m, out_s) <= 1e-5
    assert set(grads_m) == set(grads_s) and any(".folded." in n for n in grads_m) == (method == "sdlora")
    for name in grads_m:
        assert rel(grads_m[name], grads_s[name]) <= 1e-4, name
