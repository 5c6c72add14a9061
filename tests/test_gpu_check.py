"""benchmarks/gpu_check.py: the GPU check's plumbing on CPU (its --smoke mode), and how it records results.

The real check needs a CUDA machine; here every part runs at toy size and must come back with numbers.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("hardware", "quickstart", "speed", "loader", "stacked")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results_json(folder: Path, acc: float, status: str = "finished") -> None:
    folder.mkdir(parents=True)
    record = {
        "status": status,
        "precision": "bf16",
        "config": {"training": {"compile": False}},
        "timing": {"train_s": 1.5, "eval_s": 0.5, "images_per_s": 100.0, "peak_memory_mb": 900.0},
        "accuracy_matrix": {"class_incremental": [[acc, None], [0.5, 0.5]]},
        "metrics": {"acc": acc},
        "heads": {"linear": {"metrics": {"acc": 0.4}}},
    }
    (folder / "results.json").write_text(json.dumps(record))


def test_run_summaries_read_results_and_flag_non_finite_numbers(gpu_check, tmp_path):
    results_json(tmp_path / "lora", 0.75)
    results_json(tmp_path / "pissa", float("nan"))
    results_json(tmp_path / "wegeft", 0.5, status="failed")
    runs = gpu_check.summarize_runs(tmp_path)
    assert runs["lora"]["finite"] and runs["lora"]["acc"] == 0.75 and runs["lora"]["linear_acc"] == 0.4
    assert runs["lora"]["precision"] == "bf16" and runs["lora"]["train_s"] == 1.5
    assert runs["pissa"]["finite"] is False
    assert runs["wegeft"] == {"status": "failed", "error": None}


def test_a_failing_part_is_recorded_and_the_next_still_runs(gpu_check, tmp_path, monkeypatch):
    def boom(ctx):
        raise ValueError("no such GPU")

    monkeypatch.setattr(gpu_check, "PARTS", {"first": boom, "second": lambda ctx: {"value": 3.0}})
    path = gpu_check.main(["--smoke", "--parts", "first,second", "--out", str(tmp_path), "--work", str(tmp_path)])
    parts = json.loads(path.read_text())["parts"]
    assert parts["first"]["error"] == "ValueError: no such GPU" and "Traceback" in parts["first"]["traceback"]
    assert parts["second"]["value"] == 3.0 and "error" not in parts["second"]
    assert parts["second"]["seconds"] >= 0 and parts["second"]["over_budget"] is False


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_smoke_mode_runs_every_part_with_numbers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    # The budgets are sized for the GPU run; a shared (or paused) test machine gets ten times as long.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--budget-scale", "10"]
    cmd += ["--out", str(tmp_path)]
    proc = subprocess.run([*cmd, "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check-*-smoke.json")
    assert str(path) in proc.stdout  # the script ends by saying where the JSON is
    record = json.loads(path.read_text())
    parts = record["parts"]
    assert tuple(parts) == PARTS
    for name, part in parts.items():
        assert "error" not in part, f"{name}: {part.get('error')}\n{part.get('traceback')}"

    assert parts["hardware"]["info"]["cpu_model"] and parts["hardware"]["describe"]
    quick = parts["quickstart"]
    for label in ("auto", "compile"):
        run = quick[label]
        assert "error" not in run and run["returncode"] == 0 and run["runs"]
        assert run["precision_ok"] and run["all_finite"]
        for r in run["runs"].values():
            assert r["status"] == "finished" and r["compile"] == (label == "compile")
            assert positive(r["train_s"]) and positive(r["peak_memory_mb"]) and 0 <= r["acc"] <= 1

    methods = parts["speed"]["methods"]
    assert {"limit", "lora", "full"} <= set(methods)
    assert all(positive(m["fp32"]["images_per_s"]) and positive(m["fp32"]["ratio_to_limit"]) for m in methods.values())
    assert methods["limit"]["fp32"]["ratio_to_limit"] == 1.0

    for case in ("digits", "imagenet_r"):
        loader = parts["loader"][case]
        assert positive(loader["step_images_per_s"]) and positive(loader["train_images_per_s"])
        assert set(loader["loader"]) == {"0", "1"}
        assert all(positive(v["images_per_s"]) and v["images"] > 0 for v in loader["loader"].values())
        assert isinstance(loader["starved"], bool)

    stacked = parts["stacked"]
    assert stacked["experiences_done"] == 20 and len(stacked["per_experience"]) == 20
    rows = stacked["per_experience"]
    assert all(positive(r["train_peak_mb"]) and positive(r["eval_peak_mb"]) for r in rows)
    # stack: every experience freezes its branch and adds a new one; frozen branches are folded into buffers
    # (adapters/fold.py), so neither the parameters nor the trained part grow with the stream
    assert rows[-1]["params"]["total"] == rows[0]["params"]["total"]
    assert rows[-1]["params"]["trainable"] == rows[0]["params"]["trainable"]
    assert 0 <= stacked["acc_after_last"] <= 1
