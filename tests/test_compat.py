"""The README's compatibility table (Avalanche strategy × method × policy with PEFTPlugin) stays true.

Every strategy class ``avalanche.training`` exports must have a row (a new Avalanche class fails here
until ``python benchmarks/compat/compat.py --write-readme`` is rerun), the README block must be exactly the
rendering of the stored results, and each row's lora/continue cell is re-measured against the stored one
(a tenth of a second each; the full grid with its resume checks is the script's job, minutes on 2 cores).
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

# The table generator is a developer script (benchmarks/compat/), not part of the package.
FOLDER = Path(__file__).resolve().parent.parent / "benchmarks" / "compat"
sys.path.insert(0, str(FOLDER))  # compat.py imports its sibling rows.py
_spec = importlib.util.spec_from_file_location("compat", FOLDER / "compat.py")
compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compat)

STORED = json.loads(compat.RESULTS.read_text())


@pytest.mark.parametrize("name", compat.avalanche_strategies())
def test_every_avalanche_strategy_has_a_row(name):
    assert name in STORED["rows"], f"Avalanche exports {name} but the table has no row: rerun the compat script"


def test_every_registered_strategy_has_a_row():
    registered = {entry["registered"] for entry in STORED["rows"].values()} - {None}
    assert registered == set(compat.STRATEGIES.names())


def test_readme_table_is_the_rendering_of_the_stored_results():
    text = compat.README.read_text()
    block = text.split(compat.BEGIN, 1)[1].split(compat.END, 1)[0]
    assert block.strip() == compat.render(STORED).strip()


@pytest.mark.parametrize("row", compat.rows())
def test_stored_cell_still_holds(row):
    now = compat.run_cell(row, "lora", "continue")
    stored = {k: v for k, v in STORED["rows"][row]["cells"]["lora/continue"].items() if k != "resume"}
    assert now == stored
