"""Interference control and the new methods inside real runs: composition with Naive and Replay, exact
resume after a crash, and the tracker's input-side overlap near chance where the update is controlled."""

import pytest

from avl_peft.study import experiment
from avl_peft.study.config import expand, validate_study
from avl_peft.study.experiment import run_experiment

KWARGS = {"img_size": 16, "patch_size": 4, "depth": 1}
VARIANTS = {
    "inflora": ("inflora", {"rank": 2}),
    "sdlora": ("sdlora", {"rank": 2}),
    "lora-project": ("lora", {"rank": 2, "interference": "project"}),
    "wegeft-orthogonal": ("wegeft", {"rank": 2, "interference": "orthogonal", "lambda": 1.0}),
}


def _cfg(method, options, *, policy="stack", strategy="naive", n=3, tracker=False):
    data = {
        "backbone": {"name": "vit_tiny_patch16_224", "kwargs": KWARGS},
        "scenario": {"name": "synthetic", "n_experiences": n},
        "training": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "train_mask": "seen"},
        "method": {"name": method, "policy": policy, "options": options},
        "strategy": {"name": strategy, "options": {"mem_size": 30} if strategy == "replay" else {}},
        "subspace": {"enabled": tracker, "k": 2, "exact": True},
    }
    ((_, cfg),) = expand(validate_study(data))
    return cfg


@pytest.mark.parametrize("strategy", ["naive", "replay"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_new_methods_and_options_compose_with_strategies(variant, strategy, tmp_path):
    method, options = VARIANTS[variant]
    out = run_experiment(_cfg(method, options, strategy=strategy), tmp_path, progress=False)
    ci = out["accuracy_matrix"]["class_incremental"]
    assert all(ci[t][t] > 1 / 6 for t in range(3)), ci  # each experience learned (6 classes: chance 1/6)
    assert out["run"]["policy"] == "stack"
    assert (tmp_path / "checkpoints" / "exp_2.pt").exists()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_new_methods_resume_exactly_after_a_crash(variant, tmp_path, monkeypatch):
    method, options = VARIANTS[variant]
    cfg = _cfg(method, options)
    reference = run_experiment(cfg, tmp_path / "ref", progress=False)
    original = experiment.run_state.save_run_state

    def crash_after_first(run_dir, t, state):
        original(run_dir, t, state)
        raise KeyboardInterrupt  # like a kill right after experience 0's state reached the disk

    monkeypatch.setattr(experiment.run_state, "save_run_state", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(experiment.run_state, "save_run_state", original)
    assert not (tmp_path / "run" / "results.json").exists()  # the crash landed mid-run
    resumed = run_experiment(cfg, tmp_path / "run", progress=False, resume=True)
    assert resumed["resumed_at_experience"] == 1
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]


def _input_overlap(out):
    values = [r["input_overlap"] for r in out["subspace"][1:]]
    return sum(values) / len(values)


@pytest.mark.slow
def test_interference_control_keeps_input_overlap_near_chance(tmp_path):
    """Input-side overlap of each experience's update with the earlier ones: high when one LoRA keeps
    training (policy continue), near chance (≈ k·t/d_in for random subspaces) with orthogonal or project."""
    plain = run_experiment(
        _cfg("lora", {"rank": 2}, policy="continue", n=3, tracker=True), tmp_path / "a", progress=False
    )
    project = run_experiment(
        _cfg("lora", {"rank": 2, "interference": "project"}, n=3, tracker=True), tmp_path / "b", progress=False
    )
    orthogonal = run_experiment(
        _cfg("lora", {"rank": 2, "interference": "orthogonal", "lambda": 10.0}, n=3, tracker=True),
        tmp_path / "c",
        progress=False,
    )
    base = _input_overlap(plain)
    assert base > 0.3, base
    assert _input_overlap(project) < 0.35 * base, (_input_overlap(project), base)
    assert _input_overlap(orthogonal) < 0.05, _input_overlap(orthogonal)
