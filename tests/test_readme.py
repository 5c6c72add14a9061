"""The README's Python examples run as written (with a shorter schedule, a one-block pretrained backbone in a
temporary cache and a temporary log folder)."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from avl_peft import run_experiment
from avl_peft.study.config import expand, validate_study

README = (Path(__file__).parent.parent / "README.md").read_text()
# The export example reads the quickstart's exports (minutes to make): it is run by hand and its output quoted.
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "exports/lora_" not in b]


def test_readme_has_the_examples():
    assert len(BLOCKS) >= 2
    assert "inject" in BLOCKS[0] and "PEFTPlugin" in BLOCKS[1]


# configs/pretrain_glyphs.yaml at test size: one block, a few hundred glyphs (seconds, not minutes).
TINY_PRETRAIN = {
    "name": "tiny",
    "backbone": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4, "depth": 1}},
    "data": {"train_per_class": 6, "test_per_class": 2},
    "training": {"epochs": 1, "batch_size": 32, "threads": 1},
}


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AVL_PEFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(TINY_PRETRAIN))
    for block in BLOCKS:
        code = block.replace("train_epochs=2", "train_epochs=1")
        code = code.replace('"configs/pretrain_glyphs.yaml"', '"pretrain.yaml"')
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    for plugin in ("prototype", "linear"):
        matrix = namespace[plugin].matrices["class_incremental"]
        assert len(matrix) == 5 and all(0.0 <= v <= 1.0 for row in matrix for v in row)
    assert namespace["prototype"].matrices != namespace["linear"].matrices  # the statistics head scored
    assert list((tmp_path / "cache").rglob("tiny-*/model.safetensors"))  # built through the pretrain cache
    # The script is the study run `avl-peft run` makes of the same settings: the same matrices, both heads.
    training = {"lr": 0.001, "epochs": 1, "batch_size": 32, "train_mask": "current", "head": "prototype"}
    study = {
        "backbone": {**TINY_PRETRAIN["backbone"], "pretrain": str(tmp_path / "pretrain.yaml")},
        "scenario": {"name": "digits", "n_experiences": 5},
        "training": {**training, "precision": "fp32", "threads": 1},
        "method": {"name": "lora", "options": {"rank": 8}},
        "subspace": {"enabled": False},
    }
    ((_, cfg),) = expand(validate_study(study))
    ran = run_experiment(cfg, tmp_path / "run", progress=False)
    pairs = [
        (namespace["prototype"], ran["accuracy_matrix"]),
        (namespace["linear"], ran["heads"]["linear"]["accuracy_matrix"]),
    ]
    for plugin, recorded in pairs:
        for kind in ("class_incremental", "task_aware"):
            expected = torch.tensor(recorded[kind])
            torch.testing.assert_close(torch.tensor(plugin.matrices[kind]), expected, atol=1e-6, rtol=0)
