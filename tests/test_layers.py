"""The layers contract (pyproject.toml, docs/design.md): it holds, and it catches a reversed import."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
LINT = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_layers_contract_holds():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line",
    [
        ("avl_peft/adapters/lora.py", "from ..study import results  # reversed\n"),  # adapters -> study
        ("avl_peft/adapters/lora.py", "import avalanche  # forbidden\n"),  # adapters -> avalanche
        ("avl_peft/cl/loss.py", "from .. import cli  # reversed\n"),  # anything -> cli
    ],
)
def test_a_reversed_import_breaks_the_contract(tmp_path, module, line):
    shutil.copytree(ROOT / "avl_peft", tmp_path / "avl_peft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + rest if sep else line + text)
    result = _lint(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
