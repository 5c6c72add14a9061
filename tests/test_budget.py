"""Equal-budget selection: exact counts (tied to inject), never over budget, and maximal."""

import copy

import pytest
from conftest import tiny_vit

import avl_peft
from avl_peft.adapters import METHODS
from avl_peft.adapters.budget import (
    budget_table,
    count_adapter_params,
    select_for_budget,
)
from avl_peft.adapters.loretta import MAX_BUDGET_RANK as LORETTA_MAX_RANK
from avl_peft.adapters.loretta import TT_RANKS
from avl_peft.errors import ConfigError

BUDGETS = (7_000, 20_000, 75_000, 400_000)


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


def injected_count(model, method, targets=None, **options):
    if method == "pissa":  # the count does not depend on how A₀, B₀ are computed; exact SVD is slow on CPU
        options.setdefault("svd_niter", 1)
    m = avl_peft.inject(copy.deepcopy(model), method, targets=targets, **options)
    return avl_peft.parameter_counts(m)["adapter"]


def max_rank(model, method, targets=None):
    from avl_peft.adapters.inject import find_targets

    cls = METHODS.get(method)
    modules = dict(model.named_modules())
    return min(cls.max_rank(*modules[n].weight.shape) for n in find_targets(model, targets))


@pytest.mark.parametrize(
    "method, options",
    [
        ("lora", {"rank": 1}),
        ("lora", {"rank": 5, "alpha": 16}),
        ("pissa", {"rank": 3}),
        ("wegeft", {"rank": 4}),
        ("wegeft", {"rank": 4, "share": False}),
        ("loretta", {"rank": 8, "tt_rank": 5}),
        ("loretta", {"rank": 7, "tt_rank": 2}),
        ("loretta", {"rank": 44, "tt_rank": 16}),
    ],
)
def test_counts_equal_what_inject_produces(model, method, options):
    assert count_adapter_params(method, backbone_model=model, **options) == injected_count(model, method, **options)


@pytest.mark.parametrize("targets", [["attn.qkv"], ["mlp.fc1", "mlp.fc2"], [r"blocks\.0\.attn\.(qkv|proj)"]])
def test_counts_follow_targets(model, targets):
    for method, options in [("lora", {"rank": 2}), ("wegeft", {"rank": 3}), ("loretta", {"rank": 4, "tt_rank": 3})]:
        expected = injected_count(model, method, targets=targets, **options)
        assert count_adapter_params(method, backbone_model=model, targets=targets, **options) == expected


def test_counting_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    select_for_budget("pissa", 50_000, backbone_model=model)
    assert getattr(model, "avl_peft_injection", None) is None
    after = model.state_dict()
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


@pytest.mark.parametrize("method", [m for m in METHODS.names() if METHODS.get(m).budget_knobs == ("rank",)])
@pytest.mark.parametrize("budget", BUDGETS)
def test_rank_methods_fit_and_are_maximal(model, method, budget):
    chosen = select_for_budget(method, budget, backbone_model=model)
    assert set(chosen) == {"rank", "adapter_params"}
    n, rank = chosen["adapter_params"], chosen["rank"]
    assert n <= budget
    assert n == injected_count(model, method, rank=rank)
    if rank < max_rank(model, method):
        assert count_adapter_params(method, backbone_model=model, rank=rank + 1) > budget


@pytest.mark.parametrize("budget", BUDGETS[:3])
def test_loretta_picks_the_largest_fitting_pair(model, budget):
    chosen = select_for_budget("loretta", budget, backbone_model=model)
    assert set(chosen) == {"rank", "tt_rank", "adapter_params"}
    assert chosen["tt_rank"] in TT_RANKS and 1 <= chosen["rank"] <= LORETTA_MAX_RANK
    n = chosen["adapter_params"]
    assert n <= budget
    assert n == injected_count(model, "loretta", rank=chosen["rank"], tt_rank=chosen["tt_rank"])
    # maximal over the whole search space (the count is not monotone in rank, so check every pair)
    for r in range(1, LORETTA_MAX_RANK + 1):
        for t in TT_RANKS:
            other = count_adapter_params("loretta", backbone_model=model, rank=r, tt_rank=t)
            assert not n < other <= budget, (r, t, other)


def test_fixed_options_are_kept_and_the_rest_searched(model):
    chosen = select_for_budget("loretta", 20_000, backbone_model=model, rank=8)
    assert chosen["rank"] == 8
    assert chosen["adapter_params"] == injected_count(model, "loretta", rank=8, tt_rank=chosen["tt_rank"])
    assert count_adapter_params("loretta", backbone_model=model, rank=8, tt_rank=chosen["tt_rank"] + 1) > 20_000
    unshared = select_for_budget("wegeft", 20_000, backbone_model=model, share=False)
    shared = select_for_budget("wegeft", 20_000, backbone_model=model)
    assert unshared["share"] is False and unshared["rank"] < shared["rank"]  # per-layer pairs cost more
    assert unshared["adapter_params"] == injected_count(model, "wegeft", rank=unshared["rank"], share=False)
    targeted = select_for_budget("lora", 20_000, backbone_model=model, targets=["attn.qkv"])
    assert targeted["adapter_params"] == injected_count(model, "lora", targets=["attn.qkv"], rank=targeted["rank"])
    assert targeted["rank"] > select_for_budget("lora", 20_000, backbone_model=model)["rank"]


def test_a_budget_at_an_exact_count_is_reached(model):
    exact = count_adapter_params("lora", backbone_model=model, rank=3)
    assert select_for_budget("lora", exact, backbone_model=model) == {"rank": 3, "adapter_params": exact}
    assert select_for_budget("lora", exact - 1, backbone_model=model)["rank"] == 2


BUDGETED = [m for m in METHODS.names() if METHODS.get(m).budget_knobs]


@pytest.mark.parametrize("method", [m for m in METHODS.names() if m not in BUDGETED])
def test_baselines_have_no_budget(model, method):
    with pytest.raises(ConfigError, match="no parameter budget"):
        select_for_budget(method, 10_000, backbone_model=model)


@pytest.mark.parametrize("method", BUDGETED)
def test_budget_below_the_minimum_names_it(model, method):
    # the smallest adapter: rank 1 with each setting of the method's other knobs (LoRETTA's tt_rank)
    minimum = min(
        count_adapter_params(method, backbone_model=model, **knobs)
        for knobs in METHODS.get(method).budget_candidates(1, {})
    )
    with pytest.raises(ConfigError, match=f"{minimum:,} parameters"):
        select_for_budget(method, minimum - 1, backbone_model=model)
    assert select_for_budget(method, minimum, backbone_model=model)["adapter_params"] == minimum


@pytest.mark.parametrize("budget", [0, -5, 1.5, True, "100"])
def test_invalid_budgets_are_rejected(model, budget):
    with pytest.raises(ConfigError, match="budget must be"):
        select_for_budget("lora", budget, backbone_model=model)


def test_bad_options_and_targets_are_config_errors(model):
    with pytest.raises(ConfigError, match="has no option 'rnak'"):
        select_for_budget("lora", 10_000, backbone_model=model, rnak=3)
    with pytest.raises(ConfigError, match="matches no nn.Linear"):
        select_for_budget("lora", 10_000, backbone_model=model, targets=["attn.nothing"])
    with pytest.raises(ConfigError, match="unknown method"):
        select_for_budget("lorra", 10_000, backbone_model=model)


def test_budget_table_has_every_adapter_method(model):
    rows = budget_table(model, 20_000)
    assert [r["method"] for r in rows] == BUDGETED
    for row in rows:
        assert row["error"] is None
        assert row["adapter_params"] <= 20_000
        assert row["adapter_params"] == injected_count(model, row["method"], **row["options"])
    tight = {r["method"]: r for r in budget_table(model, 3_000)}  # below LoRA's rank 1, above WeGeFT's
    assert tight["lora"]["options"] is None and "below the smallest" in tight["lora"]["error"]
    assert tight["wegeft"]["adapter_params"] <= 3_000 and tight["wegeft"]["error"] is None
