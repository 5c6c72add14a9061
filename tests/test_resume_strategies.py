"""Kill and resume a covering set of (method, registered strategy) pairs: the resumed run's accuracy matrices
equal the uninterrupted run's (1e-6).

The kill is injected in-process right after a run state reached the disk (as SIGKILL would find it; the
real-signal version is tests/test_resume.py), and the test checks it landed mid-run: no results.json, the
state file there, the run resumed at the next experience. A tiny ViT (depth 1, 16 px, 8 px patches) on 3
synthetic experiences keeps each pair around a second.
"""

import functools
import warnings

import pytest

from avl_peft.adapters import METHODS
from avl_peft.cl.strategies import STRATEGIES
from avl_peft.errors import ConfigError
from avl_peft.study import experiment as study
from avl_peft.study.config import expand, validate_study


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


# Strategies whose saved state holds a model or dicts keyed by parameter name (LwF/LFL's previous model,
# GDumb's and from-scratch's model re-creation, EWC/MAS/SI/RWalk's importances): how the adapter's
# parameters enter that state differs per method, so these run with every method. The buffer-only strategies
# (replay, cumulative, agem, gem, mir, er_ace, mer) save datasets, which no method touches: LoRA covers them.
MODEL_STATE_STRATEGIES = ("lwf", "gdumb", "lfl", "from_scratch", "ewc", "mas", "si", "rwalk")
# The policies and the base session, on naive plus one model-state strategy of each kind.
POLICY_VARIANTS = (
    ("lora", "merge", False),
    ("pissa", "merge", False),
    ("lora", "stack", False),
    ("lora", "continue", True),
)


@functools.cache  # called for the parametrisation at collection and again by the coverage test
def _accepted(method, strategy):
    """False if the config is refused before training (l2p with an adapter, si with a stacking method)."""
    if STRATEGIES.get(strategy).check is None:
        return True
    try:
        make_cfg(method, strategy)
    except ConfigError:
        return False
    return True


def pairs():
    """A covering set: every strategy with LoRA (or its first accepted method), every method with naive, every
    method with the model-state strategies, and the merge/stack/pretrain variants."""
    cases = {}  # (method, strategy, policy, pretrain) -> None, in insertion order

    def add(method, strategy, policy=None, pretrain=False):
        if _accepted(method, strategy):
            cases[(method, strategy, policy, pretrain)] = None

    for strategy in STRATEGIES.names():
        method = next(m for m in ["lora", *METHODS.names()] if _accepted(m, strategy))
        add(method, strategy)
    for method in METHODS.names():
        for strategy in ("naive", *MODEL_STATE_STRATEGIES):
            add(method, strategy)
    for strategy in ("naive", "ewc", "lwf"):
        for method, policy, pretrain in POLICY_VARIANTS:
            add(method, strategy, policy, pretrain)
    for method, policy in (("wegeft", "merge"), ("loretta", "merge"), ("full", "continue"), ("head", "continue")):
        add(method, "naive", policy, policy == "continue")
    return [
        pytest.param(
            *case, id="-".join([case[0], case[1], *([case[2]] if case[2] else []), *(["pre"] if case[3] else [])])
        )
        for case in cases
    ]


def matrices_equal(a, b, tol=1e-6):
    return all(abs(x - y) <= tol for kind in a for ra, rb in zip(a[kind], b[kind]) for x, y in zip(ra, rb))


def test_every_registered_strategy_resumes_exactly():
    """No registered strategy restarts silently: each claims exact resume (the pairs below prove it)."""
    assert [n for n in STRATEGIES.names() if not STRATEGIES.get(n).resumable] == []


def test_pairs_cover_every_method_and_strategy():
    ids = {tuple(p.values[:2]) for p in pairs()}
    assert {m for m, _ in ids} == set(METHODS.names())
    assert {s for _, s in ids} == set(STRATEGIES.names())
    for method in METHODS.names():  # every accepted (method, model-state strategy) pair is there
        assert {(method, s) for s in MODEL_STATE_STRATEGIES if _accepted(method, s)} <= ids


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
