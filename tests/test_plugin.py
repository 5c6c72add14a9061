"""PEFTPlugin inside Avalanche strategies: what trains, what stays frozen, merge/pretrain lifecycles,
the optimizer pitfall, checkpoints, multi-head, and agreement of our metrics with Avalanche's.

Every run is a tiny ViT (depth 1, width 32, 16 px) on the 'synthetic' scenario: seconds per run on a CPU.
"""

import json
import math

import pytest
import torch
from avalanche.core import SupervisedPlugin

from avl_peft.adapters import AdaptedLinear
from avl_peft.adapters.inject import DEFAULT_TARGETS, adapted_layers, lineage, merge
from avl_peft.adapters.pissa import principal_factors
from avl_peft.cl.checkpoints import restore_checkpoint
from avl_peft.cl.plugin import PEFTPlugin
from avl_peft.errors import ConfigError
from avl_peft.instruments.metrics import summarize, summarize_both
from avl_peft.study import experiment as study
from avl_peft.study.config import expand, validate_study

BACKBONE = {
    "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2},
}


def make_cfg(
    method="lora",
    *,
    strategy="naive",
    n_experiences=2,
    policy="continue",
    pretrain=False,
    head="linear",
    task_incremental=False,
    options=None,
    strategy_options=None,
    epochs=2,
    lr=3e-3,
    seed=0,
    train_mask="current",
):
    if options is None:
        options = {"rank": 4} if method not in ("full", "head") else {}
    data = {
        "seed": seed,
        "backbone": BACKBONE,
        "scenario": {"name": "synthetic", "n_experiences": n_experiences},
        "training": {
            "epochs": epochs,
            "batch_size": 16,
            "lr": lr,
            "pretrain": pretrain,
            "head": head,
            "task_incremental": task_incremental,
            "train_mask": train_mask,
        },
        "method": {"name": method, "policy": policy, "options": options},
        "strategy": {"name": strategy, "options": strategy_options or {}},
    }
    ((_, cfg),) = expand(validate_study(data))
    return cfg


def snapshot(named):
    """name -> (the live tensor, a copy of its current value)."""
    return {n: (p, p.detach().clone()) for n, p in named}


def changed(snap):
    return {n for n, (p, old) in snap.items() if not torch.equal(p.detach(), old)}


def adapter_params(model):
    return [(n, p) for n, p in model.named_parameters() if ".adapter." in n]


def frozen_backbone_params(model):
    """Backbone tensors outside the adapters (the base weights of adapted layers included)."""
    return [(n, p) for n, p in model.backbone.named_parameters() if ".adapter." not in n]


def optimizer_ids(strategy):
    return {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}


class Recorder(SupervisedPlugin):
    """Appended after PEFTPlugin: sees each experience right after injection and right after training."""

    def __init__(self):
        super().__init__()
        self.before, self.after = [], []

    def before_training_exp(self, strategy, **kwargs):
        model = strategy.model
        in_optimizer = optimizer_ids(strategy)
        self.before.append(
            {
                "adapters": snapshot(adapter_params(model)),
                "backbone": snapshot(frozen_backbone_params(model)),
                "head": snapshot(model.head.named_parameters()),
                "classes": sorted(int(c) for c in strategy.experience.classes_in_this_experience),
                "trainable_missing": [
                    n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_optimizer
                ],
                "stale_in_optimizer": len(in_optimizer - {id(p) for p in model.parameters()}),
                "config": dict(model.avl_peft_injection or {}),
                "layers": dict(adapted_layers(model)),
            }
        )

    def after_training_exp(self, strategy, **kwargs):
        self.after.append({"layers": dict(adapted_layers(strategy.model))})


def build_with_recorder(cfg, run_dir=None):
    parts = study.build(cfg, run_dir)
    recorder = Recorder()
    parts.strategy.plugins.append(recorder)
    return parts, recorder


def train(parts, stop=None, start=0, evaluate=False):
    """Train experiences start..stop-1 in order (and evaluate the test stream after each if asked)."""
    strategy, benchmark = parts.strategy, parts.benchmark
    for experience in list(benchmark.train_stream)[start:stop]:
        strategy.train(experience)
        if evaluate:
            strategy.eval(benchmark.test_stream)


def probe_batch(parts, n=12):
    dataset = parts.benchmark.test_stream[0].dataset
    return torch.stack([dataset[i][0] for i in range(n)])


@torch.no_grad()
def outputs(model, x):
    was_training = model.training
    model.eval()
    out = model(x)
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------
# Composition with Avalanche strategies
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["naive", "replay", "ewc", "lwf"])
def test_plugin_composes_with_strategy(strategy):
    # replay needs every seen class in the loss, or its memory adds nothing (see the next test)
    mask = "seen" if strategy == "replay" else "current"
    parts, rec = build_with_recorder(make_cfg("lora", strategy=strategy, train_mask=mask))
    assert any(isinstance(p, PEFTPlugin) for p in parts.strategy.plugins)
    model = parts.model
    untouched = snapshot(model.backbone.named_parameters())  # before injection and training
    train(parts, 2)

    assert len(rec.before) == 2
    first = rec.before[0]
    assert first["adapters"], "no adapter parameters after injection"
    # every adapter parameter moved away from its post-injection value...
    assert changed(first["adapters"]) == set(first["adapters"])
    # ...while every frozen backbone weight is bit-identical to before training
    assert not changed(untouched)
    assert not any(p.requires_grad for _, p in frozen_backbone_params(model))
    # the head trained on each experience's own classes
    for before in rec.before:
        weight = before["head"]["classifier.weight"][0]
        rows = torch.tensor(before["classes"])
        assert not torch.equal(weight.detach()[rows], before["head"]["classifier.weight"][1][rows])
    # a single adapter set trained throughout (policy continue)
    assert rec.before[1]["layers"] == first["layers"]


@pytest.mark.parametrize("strategy", ["replay", "agem"])
def test_memory_strategies_refuse_a_loss_that_cannot_see_the_memory(strategy, recwarn):
    with pytest.raises(ConfigError, match="train_mask: seen"):
        make_cfg("lora", strategy=strategy, train_mask="current")
    recwarn.clear()
    study.build(make_cfg("lora", strategy=strategy, train_mask="seen"), None)
    assert not any("train_mask" in str(w.message) for w in recwarn.list)


# ------------------------------------------------------------------------------------------------
# policy: merge
# ------------------------------------------------------------------------------------------------


class OutputsBefore(SupervisedPlugin):
    """Inserted before PEFTPlugin: the model's outputs at the end of each experience, before any merge."""

    def __init__(self, x):
        super().__init__()
        self.x, self.outputs = x, []

    def after_training_exp(self, strategy, **kwargs):
        self.outputs.append(outputs(strategy.model, self.x))


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_merge_policy_folds_and_reinjects(method):
    parts, rec = build_with_recorder(make_cfg(method, policy="merge"))
    model, strategy = parts.model, parts.strategy
    x = probe_batch(parts)
    pre = OutputsBefore(x)
    strategy.plugins.insert(0, pre)
    initial = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}

    train(parts, 1)
    # ΔW folded at once and a fresh adapter injected for the next experience: same function, the target
    # layers' base weights changed, one backbone change recorded
    layers = adapted_layers(model)
    assert layers and set(layers.values()).isdisjoint(rec.before[0]["layers"].values())
    assert model.avl_peft_injection["method"] == method and lineage(model) == 1
    torch.testing.assert_close(outputs(model, x), pre.outputs[0], rtol=1e-4, atol=1e-5)
    after_merge = {n.replace(".base.", "."): p for n, p in model.backbone.named_parameters() if ".adapter." not in n}
    targets = [n for n in after_merge if n.endswith(tuple(f"{t}.weight" for t in DEFAULT_TARGETS))]
    assert targets
    for name, p in after_merge.items():
        if name in targets:
            assert not torch.equal(p.detach(), initial[name]), f"{name} should hold the merged ΔW"
        else:
            assert torch.equal(p.detach(), initial[name]), f"{name} is not a target and must stay frozen"

    merged = {n: p.detach().clone() for n, p in after_merge.items()}
    train(parts, 2, start=1)
    second = rec.before[1]
    assert second["layers"], "a fresh adapter is injected for the next experience"
    assert set(second["layers"].values()).isdisjoint(rec.before[0]["layers"].values())
    if method == "pissa":
        for name, layer in second["layers"].items():
            b0, a0 = principal_factors(merged[f"{name.removeprefix('backbone.')}.weight"], 4, None)
            adapter = layer.adapter
            torch.testing.assert_close(adapter.A0, a0, rtol=0, atol=1e-6)
            torch.testing.assert_close(adapter.B0, b0, rtol=0, atol=1e-6)
            old = rec.before[0]["layers"][name].adapter
            assert not torch.allclose(adapter.A0, old.A0), "PiSSA must re-derive A0 from the merged weights"
    # the second adapter was merged too (a third, fresh one waits), and the function kept
    assert set(adapted_layers(model).values()).isdisjoint(second["layers"].values()) and lineage(model) == 2
    torch.testing.assert_close(outputs(model, x), pre.outputs[1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# pretrain: base session with full fine-tuning
# ------------------------------------------------------------------------------------------------


def test_pretrain_base_session_then_adapter_only():
    parts, rec = build_with_recorder(make_cfg("lora", pretrain=True, n_experiences=3))
    model = parts.model
    train(parts, 3)

    base = rec.before[0]
    assert base["config"]["method"] == "full" and not base["adapters"]
    assert changed(base["backbone"]) == set(base["backbone"]), "the base session trains every backbone weight"
    for t in (1, 2):
        session = rec.before[t]
        assert session["config"]["method"] == "lora" and session["adapters"]
    # experience 1 injects; experience 2 keeps training the same adapter (policy continue)
    assert rec.before[2]["layers"] == rec.before[1]["layers"]
    assert changed(rec.before[1]["adapters"]) == set(rec.before[1]["adapters"])
    # from experience 1 on the backbone is bit-identical
    assert not changed(rec.before[1]["backbone"])
    assert not any(p.requires_grad for _, p in frozen_backbone_params(model))


# ------------------------------------------------------------------------------------------------
# The Avalanche optimizer pitfall
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", [{}, {"policy": "merge"}, {"pretrain": True}], ids=["continue", "merge", "pretrain"])
def test_optimizer_holds_the_injected_parameters(setup):
    parts, rec = build_with_recorder(make_cfg("lora", n_experiences=3, epochs=1, **setup))
    train(parts, 3)
    for t, before in enumerate(rec.before):
        assert not before["trainable_missing"], f"exp {t}: trainable parameters missing from the optimizer"
        if t > 0 or not setup.get("pretrain"):
            assert before["adapters"]
    # parameters of a merged adapter leave the optimizer with it
    assert [b["stale_in_optimizer"] for b in rec.before] == [0, 0, 0]


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", [{}, {"policy": "merge"}, {"pretrain": True}], ids=["continue", "merge", "pretrain"])
def test_checkpoints_load_and_reproduce(tmp_path, setup):
    method = "pissa" if setup.get("policy") == "merge" else "lora"
    cfg = make_cfg(method, epochs=1, **setup)
    parts = study.build(cfg, tmp_path)
    train(parts, evaluate=True)
    files = sorted((tmp_path / "checkpoints").glob("exp_*.pt"))
    assert [f.name for f in files] == ["exp_0.pt", "exp_1.pt"]
    states = [torch.load(f, weights_only=True) for f in files]
    assert [s["experience"] for s in states] == [0, 1]
    assert all(isinstance(v, torch.Tensor) for s in states for v in s["model"].values())
    assert "head.active_units" in states[-1]["model"]

    fresh = study.build(cfg, None).model  # same seed: the same untrained backbone
    if setup:  # the backbone changed (merge / base session): replay the checkpoints in order
        restore_checkpoint(fresh, files[0])
        if setup.get("policy") == "merge":
            merge(fresh)
    restore_checkpoint(fresh, files[-1])
    x = probe_batch(parts)
    trained = parts.model
    if setup.get("policy") == "merge":
        merge(fresh)  # the trained model merged its last adapter after the checkpoint was written
    torch.testing.assert_close(outputs(fresh, x), outputs(trained, x), rtol=1e-5, atol=1e-5)
    if not setup:
        assert any(isinstance(m, AdaptedLinear) for m in fresh.modules())


# ------------------------------------------------------------------------------------------------
# Task-incremental (multi-head)
# ------------------------------------------------------------------------------------------------


def test_multi_head_with_task_labels(tmp_path):
    cfg = make_cfg("lora", task_incremental=True, n_experiences=3, epochs=3, lr=1e-2)
    results = study.run_experiment(cfg, tmp_path, progress=False)
    parts = study.build(cfg, None)
    assert type(parts.model).__name__ == "MultiHeadViT"
    assert [e.task_label for e in parts.benchmark.train_stream] == [0, 1, 2]
    a = results["accuracy_matrix"]["task_aware"]
    assert len(a) == 3 and all(0.0 <= a[t][i] <= 1.0 for t in range(3) for i in range(t + 1))
    assert sum(a[t][t] > 0.5 for t in range(3)) >= 2, a  # 2 classes per task: chance is 0.5
    # a task head masks the classes it was not trained on (-1000), but Avalanche's MultiTaskModule pads a
    # narrower head's output with zeros up to the widest head, and those zeros can win the
    # class-incremental argmax when a head's own logits are negative: class-incremental <= task-aware.
    # Avalanche's accuracy takes the same argmax, so its forgetting agrees with ours.
    ci = results["accuracy_matrix"]["class_incremental"]
    assert all(ci[t][i] <= a[t][i] for t in range(3) for i in range(t + 1))
    assert ci[0][0] == a[0][0], "before other heads exist nothing pads the output"
    avalanche = results["avalanche_metrics"]
    assert results["metrics"]["forgetting"] == pytest.approx(
        avalanche["StreamForgetting/eval_phase/test_stream"], abs=1e-6
    )


# ------------------------------------------------------------------------------------------------
# Our summary == Avalanche's metrics
# ------------------------------------------------------------------------------------------------


def test_summary_matches_avalanche_metrics():
    parts = study.build(make_cfg("lora", n_experiences=3, epochs=3, lr=1e-2), None)
    strategy, benchmark, matrix = parts.strategy, parts.benchmark, parts.matrix
    evaluator = parts.evaluator
    for t, experience in enumerate(benchmark.train_stream):
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)
        last = evaluator.get_last_metrics()
        for i in range(3):  # a[t][i] is Avalanche's Top1_Acc_Exp of experience i after training t
            ours = matrix.matrices["class_incremental"][t][i]
            theirs = last[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{i:03d}"]
            assert math.isclose(ours, theirs, abs_tol=1e-9), (t, i, ours, theirs)
    # an extra evaluation on the train stream must not overwrite the test matrix
    before = json.dumps(matrix.matrices)
    strategy.eval(benchmark.train_stream)
    assert json.dumps(matrix.matrices) == before
    strategy.eval(benchmark.test_stream)  # restore Avalanche's "last" values to the test stream

    summary = summarize(matrix.matrices["class_incremental"])
    last = evaluator.get_last_metrics()
    assert summary["forgetting"] > 0.05, "the run must forget for this comparison to mean anything"
    assert abs(summary["forgetting"] - last["StreamForgetting/eval_phase/test_stream"]) < 1e-6
    assert abs(summary["bwt"] - last["StreamBWT/eval_phase/test_stream"]) < 1e-6
    assert abs(summary["acc"] - last["Top1_Acc_Stream/eval_phase/test_stream/Task000"]) < 1e-6


# ------------------------------------------------------------------------------------------------
# run_experiment's folder
# ------------------------------------------------------------------------------------------------


def test_run_experiment_writes_results_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg("lora", n_experiences=3, epochs=2, lr=1e-2)
    results = study.run_experiment(cfg, tmp_path, run_id="lora-test", progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["schema"] == 2 and on_disk["run"]["id"] == "lora-test"
    assert on_disk["accuracy_matrix"] == results["accuracy_matrix"]
    assert set(on_disk["accuracy_matrix"]) == {"class_incremental", "task_aware"}
    assert on_disk["metrics"] == pytest.approx(summarize_both(on_disk["accuracy_matrix"]))
    avalanche = on_disk["avalanche_metrics"]
    assert on_disk["metrics"]["forgetting"] == pytest.approx(
        avalanche["StreamForgetting/eval_phase/test_stream"], abs=1e-6
    )
    assert on_disk["metrics"]["bwt"] == pytest.approx(avalanche["StreamBWT/eval_phase/test_stream"], abs=1e-6)
    assert (tmp_path / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("exp_*.pt")) == ["exp_0.pt", "exp_1.pt", "exp_2.pt"]

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under tb/"
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()  # readable right away: the logger flushes after every evaluation
    tags = acc.Tags()["scalars"]
    for tag in (
        "Top1_Acc_Stream/eval_phase/test_stream/Task000",
        "StreamForgetting/eval_phase/test_stream",
        "StreamBWT/eval_phase/test_stream",
        "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000",
    ):
        assert tag in tags, tag
    assert len(acc.Scalars("Top1_Acc_Stream/eval_phase/test_stream/Task000")) == 3
