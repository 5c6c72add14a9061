"""Validation-based selection (study/search.py, cl/scenarios/validation.py): the split, the trials, resuming."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avl_peft.cl.scenarios import build_scenario
from avl_peft.cl.scenarios.validation import carve_validation, split_indices
from avl_peft.errors import ConfigError
from avl_peft.study import search
from avl_peft.study.config import expand, validate_study
from avl_peft.study.report import build_report
from avl_peft.study.run_study import run_study

STUDY = {
    "name": "search",
    "backbone": {"kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 2}},
    "scenario": {"name": "synthetic", "n_experiences": 2, "options": {"n_classes": 4, "n_train_per_class": 20}},
    "training": {"epochs": 1, "batch_size": 8},
    "method": {"name": "lora", "options": {"rank": 2}},
    "subspace": {"enabled": False},
    "search": {"training.lr": [0.01, 0.001, 0.0001]},
    "validation": {"fraction": 0.25},
}


def _images(dataset) -> set[bytes]:
    return {dataset[i][0].numpy().tobytes() for i in range(len(dataset))}


@pytest.mark.parametrize("experiences", ["first", "all"])
def test_validation_split_never_overlaps_test_or_other_experiences(experiences):
    benchmark = build_scenario("synthetic", img_size=8, seed=3, n_experiences=3)
    carved, carve = carve_validation(benchmark, fraction=0.25, seed=5, experiences=experiences)
    test = set().union(*(_images(e.dataset) for e in benchmark.test_stream))
    originals = [_images(e.dataset) for e in benchmark.train_stream]
    assert len(carved.train_stream) == (1 if experiences == "first" else 3)
    for e, (train_exp, val_exp) in enumerate(zip(carved.train_stream, carved.test_stream)):
        train, val = _images(train_exp.dataset), _images(val_exp.dataset)
        assert val and train and not val & train  # carved: disjoint from what the trial trains on
        assert not val & test and not train & test  # the test set is never read
        assert val | train == originals[e]  # exactly experience e's training images
        others = set().union(*(o for k, o in enumerate(originals) if k != e))
        assert not val & others  # no other experience's data
        assert set(val_exp.classes_in_this_experience) == set(benchmark.train_stream[e].classes_in_this_experience)
        assert len(val) == len(carve.validation[e]) == 0.25 * len(originals[e])  # 20 per class -> 5 carved
    again, _ = carve_validation(benchmark, fraction=0.25, seed=5, experiences=experiences)  # seeded
    assert [_images(e.dataset) for e in again.test_stream] == [_images(e.dataset) for e in carved.test_stream]
    other, _ = carve_validation(benchmark, fraction=0.25, seed=6, experiences=experiences)
    assert _images(other.test_stream[0].dataset) != _images(carved.test_stream[0].dataset)


def test_split_keeps_each_class_on_both_sides_and_refuses_tiny_classes():
    targets = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    carve = split_indices([[0, 1, 2, 3, 4], [5, 6, 7, 8]], targets, fraction=0.01, seed=0, experiences="all")
    for train, val in zip(carve.train, carve.validation):
        assert set(targets[list(train)]) == set(targets[list(val)])  # at least one of each class each side
    assert carve.record() == {
        "fraction": 0.01,
        "seed": 0,
        "experiences": "all",
        "train_images": [3, 3],
        "validation_images": [2, 1],
    }
    with pytest.raises(ConfigError, match="class 1 of experience 0 has 1 training image"):
        split_indices([[0, 1, 3]], targets, fraction=0.5, seed=0, experiences="first")


def test_search_settings_are_validated_before_anything_trains():
    for bad, match in [
        ({"search": {"training.lrr": [0.1]}}, "unknown key 'training.lrr'"),
        ({"search": {"training.lr": 0.1}}, "non-empty list"),
        ({"search": {"seed": [0, 1]}}, "cannot be searched"),
        ({"search": {"training.lr": [-1.0]}}, "training.lr"),  # every trial is checked as a run
        ({"validation": {"experiences": "first", "metric": "forgetting"}}, "cannot show"),
        ({"validation": {"fraction": 1.5}}, "validation.fraction"),
        ({"training": {"pretrain": True}}, "would choose on the base session"),
        ({"claims": [{"better": "lora", "than": "full", "metric": "acc", "hed": "x"}]}, "Did you mean .head"),
        ({"claims": [{"better": "lora", "than": "full", "metric": "retention"}]}, "upstream_retention"),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate_study({**STUDY, **bad})
    # a variant may carry its own search; trials are its grid
    study = validate_study({**STUDY, "search": {}, "variants": [{"search": {"method.options.rank": [1, 2]}}]})
    [(_, cfg)] = expand(study)
    assert [values for _, values in search.trials(cfg)] == [{"method.options.rank": 1}, {"method.options.rank": 2}]


def _fake_runs(monkeypatch, crash_at: int | None = None) -> list:
    """run_experiment replaced by a recorder: a trial's score is 1 - |log10(lr) + 3| (best at lr 1e-3)."""
    calls = []

    def fake(cfg, run_dir, *, run_id, progress, resume, validation=None, extra=None):
        calls.append((run_id, cfg["training"]["lr"], validation is not None))
        if crash_at is not None and len(calls) == crash_at:
            raise KeyboardInterrupt  # killed mid-trial
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        score = 1 - abs(np.log10(cfg["training"]["lr"]) + 3)
        out = {"metrics": {"acc": score}, "timing": {"train_s": 0.1}, **(extra or {})}
        if validation is not None:
            out["validation"] = {"fraction": validation["fraction"], "experiences": validation["experiences"]}
        return out

    monkeypatch.setattr(search, "run_experiment", fake)
    return calls


def test_interrupted_search_resumes_without_rerunning_finished_trials(monkeypatch, tmp_path):
    [(rid, cfg)] = expand(validate_study(STUDY))
    calls = _fake_runs(monkeypatch, crash_at=2)
    with pytest.raises(KeyboardInterrupt):
        search.run_with_search(cfg, tmp_path, run_id=rid, progress=False, resume=True)
    assert [lr for _, lr, _ in calls] == [0.01, 0.001]  # the first trial finished, the second was killed
    assert [p.name for p in (tmp_path / "search-trials").glob("*/trial.json")] == ["trial.json"]
    calls = _fake_runs(monkeypatch)
    out = search.run_with_search(cfg, tmp_path, run_id=rid, progress=False, resume=True)
    # trial 0 is not run again; trials 1 and 2 run on the validation split; then the final run, on the test set
    assert [(lr, val) for _, lr, val in calls] == [(0.001, True), (0.0001, True), (0.001, False)]
    block = out["search"]
    assert block["chosen"] == {"training.lr": 0.001} and block["chosen_score"] == pytest.approx(1.0)
    assert block["tied"] == 1
    assert [t["values"]["training.lr"] for t in block["trials"]] == [0.01, 0.001, 0.0001]
    assert block["validation"] == {"fraction": 0.25, "experiences": "first"}
    # everything done: a third attempt runs only the final run; without resume every trial reruns
    calls = _fake_runs(monkeypatch)
    search.run_with_search(cfg, tmp_path, run_id=rid, progress=False, resume=True)
    assert [val for _, _, val in calls] == [False]
    calls = _fake_runs(monkeypatch)
    search.run_with_search(cfg, tmp_path, run_id=rid, progress=False, resume=False)
    assert len(calls) == 4


def test_a_changed_trial_config_is_not_reused(monkeypatch, tmp_path):
    [(rid, cfg)] = expand(validate_study(STUDY))
    _fake_runs(monkeypatch)
    search.run_with_search(cfg, tmp_path, run_id=rid, progress=False, resume=True)
    [(rid, cfg)] = expand(validate_study({**STUDY, "training": {**STUDY["training"], "epochs": 2}}))
    calls = _fake_runs(monkeypatch)
    search.run_with_search(cfg, tmp_path, run_id=rid, progress=False, resume=True)
    assert len(calls) == 4  # three trials with the new epochs, then the final run


def test_per_variant_selection_is_shared_by_the_seeds_and_trained_once(monkeypatch, tmp_path):
    study = validate_study({**STUDY, "grid": {"seed": [3, 4, 5]}, "validation": {"fraction": 0.25, "per": "variant"}})
    runs = expand(study)
    seeds = []
    calls = _fake_runs(monkeypatch)
    real_fake = search.run_experiment

    def fake(cfg, run_dir, **kw):
        seeds.append(cfg["seed"])
        return real_fake(cfg, run_dir, **kw)

    monkeypatch.setattr(search, "run_experiment", fake)
    blocks = [
        search.run_with_search(cfg, tmp_path / rid, run_id=rid, progress=False, resume=False)["search"]
        for rid, cfg in runs
    ]
    # three trials, once, at the selection seed (validation.seed null: 0); then each seed's own final run
    assert [(lr, val) for _, lr, val in calls] == [(0.01, True), (0.001, True), (0.0001, True)] + [(0.001, False)] * 3
    assert seeds == [0, 0, 0, 3, 4, 5]
    assert all(b["chosen"] == {"training.lr": 0.001} and b["per"] == "variant" and b["seed"] == 0 for b in blocks)
    assert len(list((tmp_path / "search-trials").glob("*/trial.json"))) == 3  # in the study folder, not a run's
    assert not any((tmp_path / rid / "search-trials").exists() for rid, _ in runs)


def test_a_shared_trial_held_by_another_run_is_waited_for_not_trained_twice(monkeypatch, tmp_path):
    import threading

    from avl_peft.safeio.locks import folder_lock

    study = validate_study({**STUDY, "validation": {"fraction": 0.25, "per": "variant", "seed": 7}})
    [(rid, cfg)] = expand(study)
    (tid, values), *_ = search.trials(cfg)
    trial_cfg = search.trial_config(cfg, values)
    assert trial_cfg["seed"] == 7
    digest = search._digest(trial_cfg)
    folder = tmp_path / "search-trials" / f"{digest[:16]}-{tid}"
    held, release = threading.Event(), threading.Event()

    def other_worker():  # holds trial 0 while "training" it, then writes its result
        with folder_lock(folder, blocking=True) as mine:
            assert mine
            held.set()
            release.wait(10)
            record = {"id": tid, "values": values, "config_sha256": digest, "seed": 7, "score": 0.5, "train_s": 1}
            (folder / "trial.json").write_text(json.dumps(record))

    thread = threading.Thread(target=other_worker)
    thread.start()
    assert held.wait(10)
    calls = _fake_runs(monkeypatch)
    timer = threading.Timer(0.3, release.set)
    timer.start()
    out = search.run_with_search(cfg, tmp_path / rid, run_id=rid, progress=False, resume=False)
    thread.join()
    # trials 1 and 2 first, trial 0 read from the other worker's file (not trained here), then the final run
    assert [(lr, val) for _, lr, val in calls] == [(0.001, True), (0.0001, True), (0.001, False)]
    assert [t["score"] for t in out["search"]["trials"]][0] == 0.5


@pytest.mark.slow
def test_study_with_search_end_to_end(tmp_path):
    torch.manual_seed(0)
    study = validate_study(
        {
            **STUDY,
            "seed": 0,
            "search": {"training.lr": [0.003, 0.0003]},
            "grid": {"seed": [0, 1], "method.name": ["lora", "head"]},
            "claims": [{"better": "lora", "than": "head", "metric": "acc"}],
        }
    )
    summary = run_study(study, tmp_path, progress=False)
    assert [s["status"] for s in summary] == ["finished"] * 4
    data = json.loads((tmp_path / "lora-rank2-naive-s0" / "results.json").read_text())
    assert data["search"]["chosen"]["training.lr"] in (0.003, 0.0003)
    assert data["config"]["training"]["lr"] == data["search"]["chosen"]["training.lr"]
    assert data["search"]["validation"]["validation_images"] == [10]  # 5 of each of the first 2 classes
    assert data["scaling"] == {"alpha_policy": "rank", "alpha": 2, "scale": 1.0}
    rows = build_report(tmp_path)
    assert len(rows) == 2  # trials are not runs of the study
    report = (tmp_path / "report.md").read_text()
    for section in ("## Confidence intervals", "## Paired comparisons", "## Claims", "## Validation-selected"):
        assert section in report
    assert "lora better than head on acc" in report
