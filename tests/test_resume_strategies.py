"""Kill and resume every (method, registered strategy) pair: the resumed run's accuracy matrices equal the
uninterrupted run's (1e-6).

The kill is injected in-process right after a run state reached the disk (as SIGKILL would find it; the
real-signal version is tests/test_resume.py), and the test checks it landed mid-run: no results.json, the
state file there, the run resumed at the next experience. A tiny ViT (depth 1, 16 px, 8 px patches) on 3
synthetic experiences keeps each pair around a second.
"""

import warnings

import pytest

from avl_peft.adapters import METHODS
from avl_peft.cl.strategies import STRATEGIES
from avl_peft.errors import ConfigError
from avl_peft.study import experiment as study
from avl_peft.study.grid import expand, validate_study


def make_cfg(method, strategy, *, policy=None, pretrain=False):
    spec, cls = STRATEGIES.get(strategy), METHODS.get(method)
    if policy is None:
        policy = "stack" if cls.requires_stack else "continue"
    data = {
        "backbone": {"kwargs": {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}},
        "scenario": {
            "name": "synthetic",
            "n_experiences": 3,
            "options": {"n_classes": 6, "n_train_per_class": 8, "n_test_per_class": 4},
        },
        "training": {
            "epochs": 1,
            "batch_size": 8,
            "lr": 0.01,
            "pretrain": pretrain,
            "train_mask": "seen" if spec.uses_memory else "current",
        },
        "method": {"name": method, "policy": policy, "options": {"rank": 2} if cls.adds_adapter else {}},
        # the compatibility table's small memories and few steps: every strategy works on 8 images per class
        "strategy": {"name": strategy, "options": dict(STRATEGIES.get(strategy).tiny_options)},
        "subspace": {"enabled": False},
    }
    ((_, cfg),) = expand(validate_study(data))
    return cfg


def pairs():
    """Every method with every registered strategy (its default policy), plus merge/stack/pretrain variants."""
    out = []
    for strategy in STRATEGIES.names():
        spec = STRATEGIES.get(strategy)
        for method in METHODS.names():
            if spec.check is not None:
                try:
                    make_cfg(method, strategy)
                except ConfigError:
                    continue  # refused before training (e.g. l2p with an adapter, si with a stacking method)
            out.append(pytest.param(method, strategy, None, False, id=f"{method}-{strategy}"))
    for strategy in ("naive", "replay", "ewc", "mas", "lwf", "gdumb"):
        for method, policy, pretrain in (
            ("lora", "merge", False),
            ("pissa", "merge", False),
            ("lora", "stack", False),
            ("lora", "continue", True),
        ):
            tag = f"{method}-{strategy}-{policy}{'-pretrain' if pretrain else ''}"
            out.append(pytest.param(method, strategy, policy, pretrain, id=tag))
    for method, policy in (("wegeft", "merge"), ("loretta", "merge"), ("full", "continue"), ("head", "continue")):
        out.append(pytest.param(method, "naive", policy, policy == "continue", id=f"{method}-naive-{policy}-pre"))
    return out


def matrices_equal(a, b, tol=1e-6):
    return all(abs(x - y) <= tol for kind in a for ra, rb in zip(a[kind], b[kind]) for x, y in zip(ra, rb))


def test_every_registered_strategy_resumes_exactly():
    """No registered strategy restarts silently: each claims exact resume (the pairs below prove it)."""
    assert [n for n in STRATEGIES.names() if not STRATEGIES.get(n).resumable] == []


def test_pairs_cover_every_method_and_strategy():
    ids = [p.values[:2] for p in pairs()]
    assert {m for m, _ in ids} == set(METHODS.names())
    assert {s for _, s in ids} == set(STRATEGIES.names())


@pytest.mark.slow
@pytest.mark.parametrize("method, strategy, policy, pretrain", pairs())
def test_kill_then_resume_equals_uninterrupted(method, strategy, policy, pretrain, tmp_path, monkeypatch):
    cfg = make_cfg(method, strategy, policy=policy, pretrain=pretrain)
    kill_after = 0 if pretrain else 1  # right after the base session, or with two experiences of state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = study.run_experiment(cfg, tmp_path / "reference", progress=False)
        original = study.run_state.save_run_state

        def save_then_die(run_dir, t, state):
            original(run_dir, t, state)
            if t == kill_after:
                raise KeyboardInterrupt  # the process dies right after the state reached the disk

        with monkeypatch.context() as m:
            m.setattr(study.run_state, "save_run_state", save_then_die)
            with pytest.raises(KeyboardInterrupt):
                study.run_experiment(cfg, tmp_path / "run", progress=False)
        run_dir = tmp_path / "run"
        assert not (run_dir / "results.json").exists(), "the kill must land mid-run"
        assert (run_dir / f"state_{kill_after}.pt").exists()
        resumed = study.run_experiment(cfg, run_dir, progress=False, resume=True)
    assert resumed["resumed_at_experience"] == kill_after + 1
    assert matrices_equal(resumed["accuracy_matrix"], reference["accuracy_matrix"]), (
        resumed["accuracy_matrix"],
        reference["accuracy_matrix"],
    )
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("exp_*.pt"))
    assert checkpoints == ["exp_0.pt", "exp_1.pt", "exp_2.pt"]
