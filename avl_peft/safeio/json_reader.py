"""Bounded JSON: size from the file's metadata, nesting and value count pre-scanned before parsing."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import DataError
from .limits import (
    JSON_MAX_BYTES,
    JSON_MAX_DEPTH,
    JSON_MAX_ITEMS,
)

# A JSON string, escapes included; blanking strings out leaves only structure, numbers and literals, so
# brackets and commas inside strings are not counted.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _check_json_structure(text: str, label: str, max_depth: int, max_items: int) -> None:
    skeleton = _JSON_STRING.sub('""', text)
    # Every value after the first is preceded by a comma, and every array/object opens with a bracket;
    # this slightly over-counts (object keys and values share a comma) and bounds the bracket loop below.
    items = skeleton.count(",") + skeleton.count("[") + skeleton.count("{")
    if items > max_items:
        raise DataError(
            f"{label} holds about {items:,} values, more than the {max_items:,} a results file may have; "
            "it was not written by avl-peft or is corrupt, so move it away or delete it"
        )
    depth = 0
    for match in _JSON_BRACKET.finditer(skeleton):
        if match.group() in "[{":
            depth += 1
            if depth > max_depth:
                line = skeleton.count("\n", 0, match.start()) + 1
                raise DataError(
                    f"{label} nests deeper than {max_depth} levels (line {line}); it was not written by avl-peft "
                    "or is corrupt, so move it away or delete it"
                )
        else:
            depth -= 1


def load_json(
    path: str | Path,
    *,
    what: str = "results file",
    max_bytes: int = JSON_MAX_BYTES,
    max_depth: int = JSON_MAX_DEPTH,
    max_items: int = JSON_MAX_ITEMS,
) -> Any:
    """Read a JSON file like :func:`json.loads`, with bounded size, nesting and number of values.

    ``NaN``, ``Infinity`` and ``-Infinity`` are accepted (runs record diverged metrics that way). Raises
    DataError naming ``<what> '<path>'`` and the problem: missing, not a regular file, too large, not
    UTF-8, empty, too deep, too many values or invalid JSON.
    """
    path = Path(path)
    label = f"{what} '{path}'"
    data = _read_bounded(path, label, max_bytes, DataError)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{label} is not UTF-8 text (byte {e.start}); it is corrupt, so move it away") from None
    if not text.strip():
        raise DataError(f"{label} is empty (an interrupted write?); delete it or rerun the run that wrote it")
    _check_json_structure(text, label, max_depth, max_items)
    try:
        return json.loads(text)
    except RecursionError:
        # Nesting is bounded above; this guards a caller that is itself already near the recursion limit.
        raise DataError(f"{label} is too deeply nested to read") from None
    except ValueError as e:  # JSONDecodeError, and integers too long for Python to convert
        raise DataError(f"{label} is not valid JSON ({e}); it is corrupt or truncated, so move it away") from None


def _read_bounded(path: Path, label: str, max_bytes: int, error: type[Exception]) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``error`` (naming ``label``) otherwise."""
    try:
        # O_NONBLOCK: opening a FIFO (a named pipe planted as a config or results file) would otherwise wait
        # forever for a writer; the fstat below then refuses it. It changes nothing for regular files.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            info = os.fstat(fd)  # of the file actually opened, not of what the path names later
            if stat.S_ISDIR(info.st_mode):
                raise error(f"{label} is a folder; pass the path of a file")
            if not stat.S_ISREG(info.st_mode):
                raise error(f"{label} is not a regular file; pass the path of a file")
            if info.st_size > max_bytes:
                raise error(f"{label} is {info.st_size:,} bytes, more than the {max_bytes:,} allowed")
            # The size can change after fstat (a file being appended to); never read more than the limit.
            with open(fd, "rb", closefd=False) as handle:
                data = handle.read(max_bytes + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise error(f"{label} does not exist; check the path") from None
    except IsADirectoryError:
        raise error(f"{label} is a folder; pass the path of a file") from None
    except OSError as e:
        raise error(f"{label} could not be read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{label} is more than the {max_bytes:,} bytes allowed")
    return data
