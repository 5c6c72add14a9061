"""Tests of avl_peft.instruments.metrics against matrices whose metrics were computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avl_peft.errors import ConfigError
from avl_peft.instruments.metrics import METRIC_NAMES, summarize, summarize_both, validate_matrix

# a[t][i]: accuracy on experience i after training experience t. Experience 0 improves after step 1
# (0.9 -> 0.95) before dropping to 0.5, so max_forgetting (from the best value) exceeds forgetting.
A3 = [
    [0.90, 0.10, 0.00],
    [0.95, 0.80, 0.20],
    [0.50, 0.70, 0.90],
]
A3_EXPECTED = {
    "acc": (0.5 + 0.7 + 0.9) / 3,  # 0.7
    "avg_incremental_acc": (0.9 + (0.95 + 0.8) / 2 + (0.5 + 0.7 + 0.9) / 3) / 3,  # 0.825
    "bwt": ((0.5 - 0.9) + (0.7 - 0.8)) / 2,  # -0.25
    "forgetting": ((0.9 - 0.5) + (0.8 - 0.7)) / 2,  # 0.25
    "max_forgetting": ((0.95 - 0.5) + (0.8 - 0.7)) / 2,  # 0.275
}

# The max of max_forgetting is at an intermediate step (t = 2 for experience 0).
A4 = [
    [0.80, 0.00, 0.00, 0.00],
    [0.70, 0.90, 0.00, 0.00],
    [0.85, 0.60, 0.70, 0.00],
    [0.40, 0.50, 0.30, 0.95],
]
A4_EXPECTED = {
    "acc": 2.15 / 4,  # 0.5375
    "avg_incremental_acc": (0.8 + 0.8 + 2.15 / 3 + 2.15 / 4) / 4,
    "bwt": -0.4,
    "forgetting": 0.4,
    "max_forgetting": ((0.85 - 0.4) + (0.9 - 0.5) + (0.7 - 0.3)) / 3,  # 0.41666...
}


@pytest.mark.parametrize(("matrix", "expected"), [(A3, A3_EXPECTED), (A4, A4_EXPECTED)], ids=["3x3", "4x4"])
def test_hand_computed_values(matrix, expected):
    result = summarize(matrix)
    assert list(result) == list(METRIC_NAMES)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name


def test_numbers_are_plain_python_floats_for_numpy_input():
    result = summarize(np.array(A3))
    assert result == pytest.approx(A3_EXPECTED)
    assert all(type(value) is float for value in result.values())


def test_single_experience_has_no_forgetting():
    result = summarize([[0.7]])
    assert result == {
        "acc": pytest.approx(0.7),
        "avg_incremental_acc": pytest.approx(0.7),
        "bwt": 0.0,
        "forgetting": 0.0,
        "max_forgetting": 0.0,
    }


def test_upper_triangle_is_ignored():
    # Accuracy on experiences not trained yet must not change anything, whether measured, NaN or None:
    # in particular a[0][1] = 1.0 must not count as the "best" accuracy of experience 1.
    upper_measured = [row[:] for row in A3]
    upper_measured[0][1] = upper_measured[0][2] = upper_measured[1][2] = 1.0
    upper_missing = [[0.9, None, math.nan], [0.95, 0.8, None], [0.5, 0.7, 0.9]]
    assert summarize(upper_measured) == summarize(A3)
    assert summarize(upper_missing) == summarize(A3)
    assert summarize(np.array(upper_measured)) == summarize(A3)


@pytest.mark.parametrize("matrix", [A3, A4, [[0.5, 0.0], [0.6, 0.4]], [[1.0, 0.0], [0.0, 1.0]]])
def test_bwt_is_minus_forgetting_and_max_forgetting_bounds_forgetting(matrix):
    result = summarize(matrix)
    assert result["bwt"] == pytest.approx(-result["forgetting"])
    assert result["max_forgetting"] >= result["forgetting"] - 1e-12


def test_random_matrices_respect_identities():
    rng = np.random.default_rng(0)
    for size in range(1, 8):
        result = summarize(rng.uniform(0.0, 1.0, size=(size, size)))
        assert result["bwt"] == pytest.approx(-result["forgetting"])
        assert result["max_forgetting"] >= result["forgetting"] - 1e-12


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([], "empty"),
        (np.zeros((0, 0)), "empty"),
        ([[0.5, 0.4]], "square"),
        ([[0.5, 0.1], [0.6]], "square"),
        (np.zeros((2, 3)), "square"),
        (np.zeros((2, 2, 2)), "2-D"),
        ([[0.5, 0.0], [math.nan, 0.6]], "NaN"),
        ([[0.5, 0.0], [0.4, 1.2]], "outside"),
        ([[-0.1]], "outside"),
        ([[85.0, 0.0], [70.0, 90.0]], "percentage"),
        ([["0.5"]], "number"),
        ([[True]], "number"),
        ([0.5], "row 0"),
        ("0.5", "list of lists"),
        (None, "list of lists"),
        (np.array([["a"]]), "dtype"),
    ],
)
def test_invalid_matrices_raise_config_error(matrix, message):
    with pytest.raises(ConfigError, match=message):
        summarize(matrix)


def test_validate_matrix_masks_the_upper_triangle():
    a = validate_matrix([[0.9, 0.2], [0.5, 0.8]])
    assert a[0, 0] == 0.9 and a[1, 0] == 0.5 and a[1, 1] == 0.8
    assert math.isnan(a[0, 1])


def test_summarize_both_prefixes_task_aware_metrics():
    result = summarize_both({"class_incremental": A3, "task_aware": A4})
    assert {name: result[name] for name in METRIC_NAMES} == summarize(A3)
    assert {name: result[f"til_{name}"] for name in METRIC_NAMES} == summarize(A4)
    assert set(result) == set(METRIC_NAMES) | {f"til_{name}" for name in METRIC_NAMES}


@pytest.mark.parametrize(
    ("matrices", "message"),
    [
        ({"class_incremental": A3}, "missing"),
        ({"class_incremental": A3, "task_awre": A3}, "unknown"),
        ([A3, A3], "dict"),
    ],
)
def test_summarize_both_rejects_wrong_keys(matrices, message):
    with pytest.raises(ConfigError, match=message):
        summarize_both(matrices)


def test_summarize_both_names_the_bad_matrix():
    with pytest.raises(ConfigError, match="task_aware"):
        summarize_both({"class_incremental": A3, "task_aware": [[2.0]]})
