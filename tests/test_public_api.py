"""The public API: ``avl_peft.__all__`` resolves, ``import avl_peft`` leaves Avalanche unloaded, the README's
Python examples import only from ``avl_peft``, and the module paths of earlier releases still work with a
DeprecationWarning naming the new path."""

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import avl_peft
from avl_peft import _moved
from avl_peft.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", avl_peft.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(avl_peft, name) is not None
    assert name in dir(avl_peft)


@pytest.mark.slow  # a fresh interpreter importing torch and timm: seconds
def test_importing_the_package_does_not_load_avalanche():
    code = "import avl_peft, sys; avl_peft.inject; assert 'avalanche' not in sys.modules, 'avalanche loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_examples_import_only_the_public_api():
    blocks = _readme_python_blocks()
    assert len(blocks) >= 3  # the Python API, the Avalanche learner, the export round trip
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("avl_peft"):
                assert node.module == "avl_peft", f"README imports from {node.module}: export it from avl_peft"
                assert {a.name for a in node.names} <= set(avl_peft.__all__)
            if isinstance(node, ast.Import):
                assert all(a.name == "avl_peft" or not a.name.startswith("avl_peft.") for a in node.names)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "avl_peft":
                assert node.attr in avl_peft.__all__, f"README uses avl_peft.{node.attr}, which is not in __all__"


# A name that scripts took from each old path, and the module that defines it now.
OLD_NAMES = {
    "backbone": ("create_continual_model", "cl.backbone"),
    "budget": ("select_for_budget", "adapters.budget"),
    "config": ("load_study", "study.config"),
    "distributed": ("world_size", "cl.distributed"),
    "evaluation": ("make_evaluator", "cl.evaluation"),
    "executors": ("sequential", "study.executors"),
    "metrics": ("summarize_both", "instruments.metrics"),
    "peft": ("inject", "adapters.inject"),
    "plugin": ("PEFTPlugin", "cl.plugin"),
    "report": ("build_report", "study.report"),
    "runner": ("run_study", "study.run_study"),
    "runstate": ("load_latest_state", "study.resume"),
    "scenarios": ("build_scenario", "cl.scenarios"),
    "study.pretrain": ("load_pretrain_config", "pretrain"),
    "study.run": ("run_one", "study.attempt"),
    "study.runner": ("plan", "study.run_study"),
    "cl.glyphs": ("CLASSES", "cl.scenarios.glyphs"),
    "study.grid": ("expand", "study.config.grid"),
    "study.schema": ("STUDY_ONLY", "study.config.schema"),
    "study.backbone_checks": ("meta_model", "study.config.backbone_checks"),
    "strategies": ("TrainMaskLoss", "cl.loss"),
    "subspace": ("SubspaceTracker", "instruments.tracker"),
}


def test_every_moved_path_has_a_test_row():
    assert set(OLD_NAMES) == set(_moved.MOVED)


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_module_path_works_with_a_deprecation_warning(old, monkeypatch):
    name, new = OLD_NAMES[old]
    monkeypatch.delitem(sys.modules, f"avl_peft.{old}", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"avl_peft.{old}")
    (warning,) = [w for w in caught if issubclass(w.category, DeprecationWarning) and "avl_peft." in str(w.message)]
    assert f"avl_peft.{new}" in str(warning.message) and "removed in avl-peft" in str(warning.message)
    assert warning.filename == __file__  # points at the importing line, not at importlib
    assert getattr(module, name) is getattr(importlib.import_module(f"avl_peft.{new}"), name)
    assert name in dir(module)
    with pytest.raises(AttributeError, match=f"avl_peft.{old}"):
        module.no_such_name  # noqa: B018


def test_a_real_module_is_never_shadowed():
    assert _moved.MovedFinder().find_spec("avl_peft.adapters") is None
    assert _moved.MovedFinder().find_spec("backbone") is None  # only avl_peft's own old paths


def _save_tiny(tiny, folder: Path) -> torch.nn.Module:
    model = tiny(depth=1, num_classes=52)
    folder.mkdir()
    save_file(model.state_dict(), folder / "model.safetensors")
    return model


def test_create_backbone_accepts_a_pretrain_output_folder(tmp_path, tiny):
    saved = _save_tiny(tiny, tmp_path / "out")
    kwargs = dict(num_classes=10, img_size=32, patch_size=4, depth=1)
    model = avl_peft.create_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "out", **kwargs)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, saved.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 10  # the pretraining head of another size is dropped
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"folder '.*empty' holds no model\.safetensors"):
        avl_peft.create_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "empty", **kwargs)


def _resolves(dotted: str) -> bool:
    """``avl_peft.a.b.c`` names a module or an attribute (modules first: a function may shadow its module)."""
    parts = dotted.split(".")
    if parts[1] in _moved.MOVED:
        return False  # an old path: it imports, with a warning, but the text should name the new one
    obj: object = avl_peft
    for i in range(1, len(parts)):
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            if not hasattr(obj, parts[i]):
                return False
            obj = getattr(obj, parts[i])
    return True


def test_module_paths_named_in_code_and_docs_exist():
    """Docstrings, messages (a report prints one) and the documents name modules that exist, not old paths."""
    files = [p for p in (ROOT / "avl_peft").rglob("*.py") if p.name != "_moved.py"] + [ROOT / "README.md"]
    stale = []
    for path in [*files, ROOT / "docs" / "design.md"]:
        text = path.read_text(encoding="utf-8")
        # paragraphs about the deprecated paths name them on purpose
        text = "\n\n".join(p for p in text.split("\n\n") if "DeprecationWarning" not in p)
        for dotted in sorted(set(re.findall(r"\bavl_peft(?:\.[A-Za-z_]\w*)+(?![\w{])", text))):
            if not _resolves(dotted):
                stale.append(f"{path.relative_to(ROOT)}: {dotted}")
    assert stale == []
