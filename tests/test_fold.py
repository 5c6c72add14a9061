"""Folded stacked branches (avl_peft/adapters/fold.py) against the unfolded definition, sizes that stay bounded,
and states written before folding refused."""

import copy

import pytest
import torch
from test_interference import adapted_mlp, data, mlp, randomise
from torch.nn import functional as F

import avl_peft
from avl_peft.adapters import (
    adapter_state_dict,
    begin_experience,
    collect_inputs,
    end_experience,
    interference_penalty,
    load_adapter_state,
    needs_inputs,
    orthogonal_penalty,
    stack,
)
from avl_peft.adapters.stack import adapted_layers

CASES = [
    ("lora", {}),
    ("pissa", {}),
    ("wegeft", {}),
    ("loretta", {}),
    ("inflora", {}),
    ("sdlora", {}),
    ("lora", {"interference": "orthogonal"}),
    ("wegeft", {"interference": "orthogonal"}),
    ("lora", {"interference": "project"}),
    ("sdlora", {"interference": "project"}),
]
N_EXP = 10  # rank 2 on 12→16 and 16→8 layers: past the dense switch (q ≥ 7, q ≥ 6) and O-LoRA's cap (12, 16 rows)


def run_stream(method: str, options: dict, n_exp: int = N_EXP):
    """Experiences as the plugin runs them under policy: stack, each branch set to random values instead of
    trained. Returns the model and, per layer, every earlier branch as the object it was (unfolded)."""
    model = adapted_mlp(method, **options)
    olds: dict[str, list] = {name: [] for name in adapted_layers(model)}
    sizes = []
    for t in range(n_exp):
        x = data(t, rank=3)
        if t:
            for name, layer in adapted_layers(model).items():
                olds[name].append(layer.adapter)
            stack(model)
        begin_experience(model, collect_inputs(model, [x]) if needs_inputs(model) else None)
        randomise(model, seed=t)
        end_experience(model, collect_inputs(model, [x]) if needs_inputs(model) else None)
        sizes.append(sum(v.numel() for k, v in adapter_state_dict(model).items() if ".folded." in k))
    return model, olds, sizes


def unfolded_delta(layer, olds) -> torch.Tensor:
    w = layer.base.weight
    return sum((old.delta_weight(w) for old in olds), layer.adapter.delta_weight(w))


@pytest.mark.parametrize(("method", "options"), CASES, ids=[f"{m}-{o.get('interference', 'none')}" for m, o in CASES])
def test_folded_and_unfolded_models_agree(method, options):
    model, olds, sizes = run_stream(method, options)
    layers = adapted_layers(model)
    if method == "sdlora":  # the magnitudes keep training: move them, the unfolded branches follow
        with torch.no_grad():
            for name, layer in layers.items():
                # Relative moves: a branch confined almost entirely away (project) has a tiny α = ‖ΔW‖ whose
                # unit direction is rounding noise; an absolute α there would compare noise with noise.
                factors = torch.rand(layer.folded.magnitudes.shape, generator=torch.Generator().manual_seed(5))
                layer.folded.magnitudes.mul_(0.5 + factors)
                for old, alpha in zip(olds[name], layer.folded.magnitudes, strict=True):
                    old.magnitude.copy_(alpha)
    reference = copy.deepcopy(mlp())
    with torch.no_grad():
        for name, layer in layers.items():
            assert layer.frozen_count() == N_EXP - 1
            getattr(reference, name).weight.add_(unfolded_delta(layer, olds[name]))
    x = data(20)
    out, expected = model(x), reference(x)
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    for name, layer in layers.items():  # each layer on its own too, through the fused forward
        xi = torch.randn(5, layer.base.in_features, dtype=torch.float64).float()
        dense = F.linear(xi, layer.base.weight + unfolded_delta(layer, olds[name]), layer.base.bias)
        assert (layer(xi) - dense).abs().max() <= 1e-5 * dense.abs().max(), name
        if method != "sdlora":
            assert layer.folded.dense.shape[0] and not layer.folded.left.shape[1], "past the switch: one dense ΔW"
    if options.get("interference") == "orthogonal":
        expected_penalty = 0.0
        owners = set()
        for name, layer in layers.items():
            owner = id(layer.adapter.factor_owner())
            if owner in owners:
                continue
            owners.add(owner)
            assert layer.folded.inputs.shape[0] <= layer.base.in_features
            for old in olds[name]:
                expected_penalty += 0.5 * orthogonal_penalty(old.input_factor(), layer.adapter.input_factor())
        assert torch.allclose(interference_penalty(model), expected_penalty, rtol=1e-5)
    if method == "sdlora":  # r (d_out + d_in) + 1 numbers per experience: directions and magnitudes
        assert sizes[-1] - sizes[-2] == sizes[-2] - sizes[-3] > 0
    else:  # the dense ΔW and O-LoRA's ≤ d_in rows: the folded state stops growing
        assert sizes[-1] == sizes[-2], "the folded state must stop growing"


def test_sdlora_magnitude_gradients_match_the_unfolded_definition():
    model, olds, _ = run_stream("sdlora", {}, n_exp=4)
    layer = model.fc1
    alpha = layer.folded.magnitudes.detach().clone().requires_grad_(True)
    x = data(21)
    w = layer.base.weight
    directions = [old._direction() / torch.linalg.matrix_norm(old._direction()) for old in olds["fc1"]]
    delta = sum(a * d for a, d in zip(alpha, directions, strict=True)) + layer.adapter.delta_weight(w)
    F.linear(x, w + delta, layer.base.bias).square().sum().backward()
    layer(x).square().sum().backward()
    assert torch.allclose(layer.folded.magnitudes.grad, alpha.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("method", "options"), [("sdlora", {}), ("lora", {"interference": "orthogonal"})])
def test_folded_state_restores_exactly_in_one_step(method, options):
    model, _, _ = run_stream(method, options, n_exp=5)
    state = adapter_state_dict(model)
    fresh = load_adapter_state(
        adapted_mlp(method, **options), {**state, **{f"head.{k}": v for k, v in model.head.state_dict().items()}}
    )
    x = data(9)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(interference_penalty(fresh), interference_penalty(model))
    assert fresh.fc1.frozen_count() == 4


def test_states_written_before_folding_are_refused_with_a_clear_message():
    model = adapted_mlp("lora")
    state = {**adapter_state_dict(model), "fc1.frozen.0.lora_A": torch.zeros(2, 12)}
    with pytest.raises(avl_peft.ConfigError, match="before frozen branches were folded"):
        load_adapter_state(model, state)


class _Kill(Exception):
    pass


def _long_run(ckpt, n_exp: int, *, kill_at: int | None = None, resume: bool = False):
    """Plain Avalanche Naive + PEFTPlugin over n_exp two-class experiences of a tiny ViT, InfLoRA (GPM memory,
    folded sum past the dense switch); each experience's shuffling seeded by its index, so an interrupted
    and resumed run can match the uninterrupted one."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from avl_peft import PEFTPlugin
    from avl_peft.cl.scenarios.in_memory import tensor_dataset

    g = torch.Generator().manual_seed(0)
    protos = torch.rand(2 * n_exp, 3, 8, 8, generator=g)
    y = torch.arange(2 * n_exp).repeat_interleave(2)
    data_set = tensor_dataset(protos[y] + 0.2 * torch.randn(len(y), 3, 8, 8, generator=g), y)
    bench = nc_benchmark(
        data_set, data_set, n_exp, task_labels=False, shuffle=False, fixed_class_order=list(range(2 * n_exp))
    )
    torch.manual_seed(0)
    model = avl_peft.create_backbone(
        "vit_tiny_patch16_224", num_classes=2 * n_exp, img_size=8, patch_size=4, depth=1, embed_dim=24, num_heads=2
    )
    # InfLoRA: its new branch is designed from the data (A) and zero (B), so a restored plugin starts the next
    # experience exactly where the uninterrupted one did (a LoRA branch's random A would be drawn anew).
    peft = PEFTPlugin("inflora", policy="stack", checkpoint_dir=ckpt, rank=2)
    start = peft.restore(model) if resume else 0

    class Killer(SupervisedPlugin):
        def after_training_exp(self, strategy, **kwargs):
            if kill_at is not None and peft.experiences_done == kill_at:
                raise _Kill  # after the PEFTPlugin wrote exp_<kill_at - 1>.pt, like a kill between experiences

    strategy = Naive(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=2,
        train_epochs=1,
        plugins=[peft, Killer()],
        evaluator=EvaluationPlugin(),
    )
    for t, exp in enumerate(bench.train_stream):
        if t >= start:
            torch.manual_seed(t)
            strategy.train(exp)
    model.eval()
    with torch.no_grad():
        return model(protos), start


@pytest.mark.slow
def test_a_run_killed_at_experience_60_of_100_resumes_to_the_uninterrupted_result(tmp_path):
    reference, _ = _long_run(tmp_path / "ref", 100)
    with pytest.raises(_Kill):
        _long_run(tmp_path / "run", 100, kill_at=60)
    assert len(list((tmp_path / "run").glob("exp_*.pt"))) == 60  # the kill landed after experience 60
    resumed, start = _long_run(tmp_path / "run", 100, resume=True)
    assert start == 60
    assert torch.equal(resumed, reference)


@pytest.mark.parametrize("method", ["lora", "sdlora"])
def test_update_factors_of_a_folded_layer_sum_to_its_update(method):
    model, _, _ = run_stream(method, {})  # past the dense switch: the folded sum is exported as its SVD factors
    for layer in adapted_layers(model).values():
        total = sum(left @ right for left, right in layer.update_factors())
        assert torch.allclose(total, layer.delta_weight(), atol=1e-6)
