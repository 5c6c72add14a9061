"""Statistics heads (prototype, RanPAC) and their Avalanche plugin."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_study

from avl_peft.cl.heads import (
    DEFAULT_LAMBDAS,
    HEADS,
    PrototypeHead,
    RanpacHead,
    RanpacHeadOptions,
    StatisticsHeadPlugin,
    build_head,
    default_ranpac_dim,
    head_options,
    prompted_vit_features,
)
from avl_peft.errors import ConfigError, DataError


def _data(n: int = 90, d: int = 6, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    centres = torch.randn(k, d, generator=gen) * 2
    return centres[labels] + torch.randn(n, d, generator=gen), labels


# -- prototype --------------------------------------------------------------------------------------


def test_prototype_known_answer():
    head = build_head("prototype", 2)
    # class 0 mean (2, 0); class 2 mean (0, 1.5); class 1 never seen
    head.update(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 2.0]]), torch.tensor([0, 0, 2, 2]))
    q = torch.tensor([[1.0, 0.5], [0.2, 1.0], [-1.0, -0.1]])
    out = head.logits(q)
    assert out.shape == (3, 3) and out.dtype == torch.float32
    assert torch.isinf(out[:, 1]).all() and (out[:, 1] < 0).all()
    norms = [math.hypot(1, 0.5), math.hypot(0.2, 1.0), math.hypot(1, 0.1)]
    expected0 = [1 / norms[0], 0.2 / norms[1], -1 / norms[2]]  # cos with (1, 0)
    expected2 = [0.5 / norms[0], 1 / norms[1], -0.1 / norms[2]]  # cos with (0, 1)
    torch.testing.assert_close(out[:, 0], torch.tensor(expected0))
    torch.testing.assert_close(out[:, 2], torch.tensor(expected2))
    assert head.predict(q).tolist() == [0, 2, 2]
    assert head.seen_classes == [0, 2]


def test_prototype_equals_nearest_cosine_mean():
    feats, labels = _data()
    head = PrototypeHead(6)
    head.update(feats, labels)
    means = torch.stack([feats[labels == c].double().mean(0) for c in range(4)])
    q = torch.randn(20, 6)
    cos = torch.nn.functional.cosine_similarity(q.double()[:, None], means[None], dim=2)
    assert head.predict(q).tolist() == cos.argmax(1).tolist()
    torch.testing.assert_close(head.logits(q), cos.float())


# -- ranpac -----------------------------------------------------------------------------------------


def test_ranpac_weights_are_closed_form_ridge():
    feats, labels = _data()
    head = RanpacHead(6, dim=40, lambdas=[0.3], seed=3)
    head.update(feats, labels)
    h = head.project(feats).double()
    y = torch.nn.functional.one_hot(labels, 4).double()
    expected = torch.linalg.inv(h.T @ h + 0.3 * torch.eye(40, dtype=torch.float64)) @ (h.T @ y)
    torch.testing.assert_close(head.weights, expected, rtol=1e-5, atol=1e-8)
    assert head.ridge == 0.3
    torch.testing.assert_close(head.logits(feats), (h @ expected).float(), rtol=1e-5, atol=1e-6)
    assert head.predict(feats).tolist() == (h @ expected).argmax(1).tolist()


def test_ranpac_lambda_chosen_on_validation_fold():
    feats, labels = _data(n=200)
    grid = [1e-3, 1e-1, 10.0, 1e3]
    head = RanpacHead(6, dim=30, lambdas=grid, val_fraction=0.25, seed=1)
    head.update(feats[:120], labels[:120])
    head.update(feats[120:], labels[120:])
    val = torch.cat([head.validation_split(120, 0), head.validation_split(80, 120)])
    assert val.tolist() == head.validation_split(200).tolist()
    assert 0 < int(val.sum()) < 200
    h = head.project(feats).double()
    y = torch.nn.functional.one_hot(labels, 4).double()
    hf, yf, hv, yv = h[~val], y[~val], h[val], y[val]
    direct = {}
    for lam in grid:
        w = torch.linalg.solve(hf.T @ hf + lam * torch.eye(30, dtype=torch.float64), hf.T @ yf)
        direct[lam] = float(((yv - hv @ w) ** 2).sum())
    losses = head.validation_losses()
    for lam in grid:
        assert losses[lam] == pytest.approx(direct[lam], rel=1e-6)
    best = min(grid, key=lambda lam: direct[lam])
    assert head.ridge == best
    full = torch.linalg.solve(h.T @ h + best * torch.eye(30, dtype=torch.float64), h.T @ y)
    torch.testing.assert_close(head.weights, full, rtol=1e-5, atol=1e-8)


def test_ranpac_empty_fold_uses_grid_median():
    head = RanpacHead(6, dim=10, lambdas=[0.1, 1.0, 10.0], val_fraction=0.01)
    head.update(torch.randn(1, 6), torch.tensor([0]))
    assert not bool(head.validation_split(1)[0])  # the only sample is in the fit fold: validation is empty
    assert head.validation_losses() is None
    assert head.ridge == 1.0


@pytest.mark.parametrize("name", ["prototype", "ranpac"])
def test_accumulation_equals_all_at_once(name):
    feats, labels = _data(n=150)
    order = torch.argsort(labels, stable=True)  # class-incremental: experiences hold disjoint classes
    feats, labels = feats[order], labels[order]
    options = {"dim": 50} if name == "ranpac" else {}
    stepwise, once = build_head(name, 6, seed=2, **options), build_head(name, 6, seed=2, **options)
    for chunk in torch.arange(150).split([40, 35, 75]):
        stepwise.update(feats[chunk], labels[chunk])
    once.update(feats, labels)
    for key, value in once.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(stepwise.state_dict()[key], value, rtol=1e-9, atol=1e-9)
        else:
            assert stepwise.state_dict()[key] == value
    q = torch.randn(10, 6)
    torch.testing.assert_close(stepwise.logits(q), once.logits(q), rtol=1e-6, atol=1e-6)
    assert stepwise.summary() == once.summary()


def test_unseen_classes_and_growth():
    head = build_head("ranpac", 4, dim=8)
    head.update(torch.randn(10, 4), torch.full((10,), 3))
    out = head.logits(torch.randn(2, 4))
    assert out.shape == (2, 4) and torch.isinf(out[:, :3]).all() and torch.isfinite(out[:, 3]).all()
    fixed = build_head("prototype", 4, n_classes=7)
    assert fixed.logits(torch.randn(2, 4)).shape == (2, 7)
    with pytest.raises(DataError, match="7 classes"):
        fixed.update(torch.randn(1, 4), torch.tensor([7]))
    with pytest.raises(DataError, match="negative"):
        fixed.update(torch.randn(1, 4), torch.tensor([-1]))
    with pytest.raises(ConfigError, match="feature_dim"):
        fixed.update(torch.randn(1, 5), torch.tensor([0]))
    with pytest.raises(ConfigError, match="seen no class"):
        build_head("prototype", 4).predict(torch.randn(1, 4))


def test_prototype_reset_recomputes_a_class():
    head = PrototypeHead(2)
    head.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    head.reset([0])
    assert head.seen_classes == [1]
    head.update(torch.tensor([[0.0, -1.0]]), torch.tensor([0]))
    torch.testing.assert_close(head.means()[0], torch.tensor([0.0, -1.0], dtype=torch.float64))
    ranpac = RanpacHead(2, dim=4)
    ranpac.update(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="all classes"):
        ranpac.reset([0])
    ranpac.reset()
    assert ranpac.seen_classes == [] and ranpac.samples == 0


@pytest.mark.parametrize("name", ["prototype", "ranpac"])
def test_state_dict_round_trip(name, tmp_path):
    feats, labels = _data()
    options = {"dim": 24} if name == "ranpac" else {}
    head = build_head(name, 6, seed=5, **options)
    head.update(feats, labels)
    torch.save(head.state_dict(), tmp_path / "head.pt")
    state = torch.load(tmp_path / "head.pt", weights_only=True)
    fresh = build_head(name, 6, seed=5, **options)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.logits(feats), head.logits(feats))
    # resuming continues exactly as an uninterrupted head
    more, more_y = _data(seed=9)
    head.update(more, more_y)
    fresh.update(more, more_y)
    torch.testing.assert_close(fresh.logits(feats), head.logits(feats))
    with pytest.raises(ConfigError, match="feature_dim"):
        build_head(name, 7, **options).load_state_dict(state)
    other = "ranpac" if name == "prototype" else "prototype"
    with pytest.raises(ConfigError, match="state is for head"):
        build_head(other, 6, **({"dim": 24} if other == "ranpac" else {})).load_state_dict(state)


# -- options and registry ---------------------------------------------------------------------------


def test_registry_and_defaults():
    assert HEADS.names() == ["linear", "prototype", "ranpac"]
    assert build_head("linear", 768) is None
    assert default_ranpac_dim(768) == 5000 and default_ranpac_dim(192) == 1920
    assert build_head("ranpac", 12).dim == 120
    assert RanpacHeadOptions().lambdas == DEFAULT_LAMBDAS and len(DEFAULT_LAMBDAS) == 17
    assert head_options("ranpac", lambdas=2.0).lambdas == (2.0,)
    # YAML 1.1 reads 1e-3 (no dot) as a string: a string that is plainly a number is one, alone or listed
    assert head_options("ranpac", lambdas=["1e-3", 10]).lambdas == (0.001, 10.0)
    assert head_options("ranpac", lambdas="1e-3").lambdas == (0.001,)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("ranpc", {}, "did you mean 'ranpac'"),
        ("ranpac", {"dimm": 10}, "Did you mean 'dim'"),
        ("prototype", {"dim": 10}, "has no option .dim.. Allowed"),
        ("ranpac", {"dim": 0}, "'dim' must be a positive integer"),
        ("ranpac", {"dim": True}, "'dim' must be a positive integer"),
        ("ranpac", {"dim": 2.5}, "'dim' must be a positive integer"),
        ("ranpac", {"dim": 200_000}, "at most 100000"),
        ("ranpac", {"lambdas": []}, "'lambdas'"),
        ("ranpac", {"lambdas": [1.0, -1.0]}, "'lambdas'"),
        ("ranpac", {"lambdas": ["x"]}, "'lambdas'"),
        ("ranpac", {"lambdas": [float("nan")]}, "'lambdas'"),
        ("ranpac", {"lambdas": True}, "'lambdas'"),  # validate.is_number: a bool is not a number
        ("ranpac", {"lambdas": [1.0, True]}, "'lambdas'"),
        ("ranpac", {"val_fraction": 0}, "'val_fraction'"),
        ("ranpac", {"val_fraction": 1.0}, "'val_fraction'"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises(ConfigError, match=f"(?i){match}"):
        build_head(name, 8, **options)


def test_bad_constructor_arguments():
    with pytest.raises(ConfigError, match="feature_dim"):
        build_head("prototype", 0)
    with pytest.raises(ConfigError, match="n_classes"):
        build_head("ranpac", 8, n_classes=0)
    with pytest.raises(ConfigError, match="seed"):
        RanpacHead(8, seed="x")
    with pytest.raises(ConfigError, match="statistics head"):
        StatisticsHeadPlugin(None)
    with pytest.raises(ConfigError, match="batch_size"):
        StatisticsHeadPlugin(PrototypeHead(4), batch_size=0)


# -- the plugin on a tiny ContinualViT ---------------------------------------------------------------


def _create_continual_model(**kwargs):
    try:  # the package is being reorganised: accept either home of the backbone module
        from avl_peft.cl.backbone import create_continual_model
    except ImportError:
        from avl_peft.backbone import create_continual_model
    return create_continual_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, **kwargs)


def _benchmark():
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    templates = torch.rand(4, 3, 32, 32, generator=gen)

    def split(n):
        y = torch.arange(4 * n) % 4
        return TensorDataset(templates[y] + 0.3 * torch.randn(4 * n, 3, 32, 32, generator=gen), y)

    return nc_benchmark(
        split(12), split(5), n_experiences=2, task_labels=False, shuffle=False, fixed_class_order=[0, 1, 2, 3]
    )


class _Recorder:
    def __new__(cls):
        from avalanche.core import SupervisedPlugin

        class Recorder(SupervisedPlugin):
            def __init__(self):
                super().__init__()
                self.eval_out, self.eval_x, self.train_out = [], [], []

            def after_eval_iteration(self, strategy, **kwargs):
                self.eval_out.append(strategy.mb_output.detach().clone())
                self.eval_x.append(strategy.mb_x.detach().clone())

            def after_training_iteration(self, strategy, **kwargs):
                self.train_out.append(strategy.mb_output.detach().clone())

        return Recorder()


def _run(with_head: bool):
    from avalanche.training import Naive

    torch.manual_seed(0)
    model = _create_continual_model()
    bench = _benchmark()
    recorder = _Recorder()
    head = PrototypeHead(model.backbone.num_features)
    plugins = [recorder] + ([StatisticsHeadPlugin(head)] if with_head else [])
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=16,
        eval_mb_size=10,
        train_epochs=1,
        device="cpu",
        plugins=plugins,
        evaluator=None,
    )
    snapshots = []
    for exp in bench.train_stream:
        strategy.train(exp)
        assert model.training  # the plugin's embedding pass restored train mode
        snapshots.append((exp, {k: v.clone() for k, v in model.state_dict().items()}))
        recorder.eval_out.clear(), recorder.eval_x.clear()
        strategy.eval(bench.test_stream)
    return model, head, recorder, snapshots, strategy


def test_plugin_replaces_class_il_predictions_and_leaves_training_alone():
    model, head, rec, snaps, strategy = _run(with_head=True)
    ref_model, _, ref_rec, ref_snaps, _ = _run(with_head=False)
    # Training path untouched: identical trained weights and training outputs with and without the plugin.
    for (_, state), (_, ref_state) in zip(snaps, ref_snaps):
        for key in ref_state:
            torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=0)
    for out, ref in zip(rec.train_out, ref_rec.train_out):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not model.backbone._forward_hooks  # hook removed after evaluation

    # The head's class means are the trained backbone's eval-mode features of each experience's data.
    exp1, _ = snaps[1]
    model.eval()
    with torch.no_grad():
        feats1 = model.backbone(torch.stack([exp1.dataset[i][0] for i in range(len(exp1.dataset))]))
        labels1 = torch.tensor([exp1.dataset[i][1] for i in range(len(exp1.dataset))])
    for c in sorted(set(labels1.tolist())):
        torch.testing.assert_close(head.means()[c], feats1[labels1 == c].double().mean(0), rtol=1e-5, atol=1e-6)
    assert head.seen_classes == [0, 1, 2, 3]

    # Class-IL predictions in the last evaluation are the prototype head's, not the linear head's.
    x = torch.cat(rec.eval_x)
    out = torch.cat(rec.eval_out)
    with torch.no_grad():
        feats = model.backbone(x)
        linear_pred = model.head(feats).argmax(1)
    assert out.argmax(1).tolist() == head.predict(feats).tolist()
    torch.testing.assert_close(out, head.logits(feats), rtol=1e-5, atol=1e-5)
    ref_out = torch.cat(ref_rec.eval_out)
    assert ref_out.argmax(1).tolist() == linear_pred.tolist()  # without the plugin: the linear head

    # Resume: the plugin state goes through torch.load(weights_only=True).
    fresh = StatisticsHeadPlugin(PrototypeHead(model.backbone.num_features))
    plugin = next(p for p in strategy.plugins if isinstance(p, StatisticsHeadPlugin))
    fresh.load_state_dict(plugin.state_dict())
    torch.testing.assert_close(fresh.head.logits(feats), head.logits(feats))


def test_plugin_masks_unseen_classes_finitely_after_first_experience():
    from avalanche.training import Naive

    torch.manual_seed(0)
    model = _create_continual_model()
    bench = _benchmark()
    rec = _Recorder()
    head = PrototypeHead(model.backbone.num_features)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=16,
        eval_mb_size=10,
        train_epochs=1,
        device="cpu",
        plugins=[rec, StatisticsHeadPlugin(head)],
        evaluator=None,
    )
    strategy.eval(bench.test_stream)  # before any training: the linear head's output is left alone
    assert head.seen_classes == []
    rec.eval_out.clear()
    strategy.train(bench.train_stream[0])
    strategy.eval(bench.test_stream)
    out = torch.cat(rec.eval_out)
    assert torch.isfinite(out).all()
    seen = out[:, :2]
    assert (out[:, 2:] < seen.min() - 999).all()  # unseen classes below every seen score
    assert set(out.argmax(1).tolist()) <= {0, 1}


def test_plugin_keeps_linear_heads_of_multi_head_model():
    from avalanche.training import Naive

    torch.manual_seed(0)
    model = _create_continual_model(head="multi")
    bench = _benchmark()
    head = PrototypeHead(model.backbone.num_features)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=16,
        eval_mb_size=10,
        train_epochs=1,
        device="cpu",
        plugins=[StatisticsHeadPlugin(head)],
        evaluator=None,
    )
    with pytest.warns(UserWarning, match="multi-head"):
        strategy.train(bench.train_stream[0])
    assert head.seen_classes == []


def test_prompted_vit_features_calls_l2p_models():
    class Query(torch.nn.Module):
        def forward(self, x):
            return {"pre_logits": x * 2}

    class Prompted(torch.nn.Module):
        def forward(self, x, cls_features=None, train=True):
            assert train is False
            return {"pre_logits": x + cls_features}

    strategy = type("S", (), {"original_vit": Query(), "model": Prompted()})()
    x = torch.ones(2, 3)
    torch.testing.assert_close(prompted_vit_features(strategy, x), torch.full((2, 3), 3.0))


# ------------------------------------------------------------------------------------------------
# Wired into runs: training.head / head_options through the YAML schema
# ------------------------------------------------------------------------------------------------


# The full ViT-Tiny width (192) at one block: these runs check accuracy above chance.
VIT_192 = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "depth": 1}}


def _run_cfg(head, **head_options):
    from avl_peft.study.config import expand, validate_study

    data = make_tiny_study(
        backbone=VIT_192,
        scenario={"n_experiences": 3},
        training={"epochs": 2, "lr": 1e-2, "head": head, "head_options": head_options},
    )
    ((_, cfg),) = expand(validate_study(data))
    return cfg


@pytest.mark.parametrize("head", ["prototype", "ranpac"])
def test_run_with_statistics_head_records_both_heads(head, tmp_path):
    from avl_peft.study.experiment import run_experiment

    options = {"dim": 256} if head == "ranpac" else {}  # a small projection: the wiring is under test, not M
    out = run_experiment(_run_cfg(head, **options), tmp_path / head, progress=False)
    ref = run_experiment(_run_cfg("linear"), tmp_path / "linear", progress=False)
    assert out["heads"]["class_incremental"] == head and ref["heads"] == {"class_incremental": "linear"}
    # The statistics head never touches training: the linear head's numbers equal a plain linear run's.
    assert out["heads"]["linear"]["accuracy_matrix"] == ref["accuracy_matrix"]
    assert out["accuracy_matrix"] != ref["accuracy_matrix"]  # the class-IL numbers come from the other head
    if head == "ranpac":
        assert out["heads"]["summary"]["lambda"] > 0


@pytest.mark.parametrize(
    "training, fragment",
    [
        ({"head": "nearest"}, "prototype"),
        ({"head": "ranpac", "head_options": {"dims": 10}}, "did you mean 'dim'"),
        ({"head": "ranpac", "head_options": {"dim": -1}}, "positive integer"),
        ({"head": "prototype", "task_incremental": True}, "use head: linear"),
        ({"head": "multi"}, "task_incremental: true"),
    ],
)
def test_bad_head_config_is_refused(training, fragment):
    from avl_peft.study.config import validate_study

    with pytest.raises(ConfigError, match=f"(?i){fragment}"):
        validate_study({"scenario": {"name": "synthetic"}, "training": training})


@pytest.mark.parametrize("method, strategy", [("wegeft", "replay"), ("inflora", "naive"), ("loretta", "replay")])
def test_statistics_heads_compose_with_strategies_and_methods(method, strategy, tmp_path, tiny_study):
    from avl_peft.study.config import expand, validate_study
    from avl_peft.study.experiment import run_experiment

    data = tiny_study(
        backbone=VIT_192,
        scenario={"n_experiences": 3},
        training={"lr": 1e-2, "head": "prototype", "train_mask": "seen"},
        method={"name": method, "policy": "stack" if method == "inflora" else "continue"},
        strategy={"name": strategy, "options": {"mem_size": 20} if strategy == "replay" else {}},
    )
    ((_, cfg),) = expand(validate_study(data))
    out = run_experiment(cfg, tmp_path, progress=False)
    assert out["heads"]["class_incremental"] == "prototype" and "linear" in out["heads"]
    ci = out["accuracy_matrix"]["class_incremental"]
    assert all(ci[t][t] > 1 / 6 for t in range(3)), ci
