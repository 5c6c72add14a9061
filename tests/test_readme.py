"""The README's Python examples run as written (with a shorter schedule and a temporary log folder)."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
# The export example reads the quickstart's exports (minutes to make): it is run by hand and its output quoted.
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "exports/lora_" not in b]


def test_readme_has_the_examples():
    assert len(BLOCKS) >= 2
    assert "inject" in BLOCKS[0] and "PEFTPlugin" in BLOCKS[1]


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in BLOCKS:
        code = block.replace("train_epochs=3", "train_epochs=1")
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    matrix = namespace["matrix"].matrices["class_incremental"]
    assert len(matrix) == 5 and all(0.0 <= v <= 1.0 for row in matrix for v in row)
    assert list((tmp_path / "runs" / "my_lora" / "tb").rglob("events.out.tfevents.*"))
