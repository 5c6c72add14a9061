"""Bounded safetensors: the file's size and its JSON header checked before any tensor is built.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets) and the raw data. The ``safetensors`` library trusts neither the header nor the offsets blindly,
but it will allocate what the header describes; a hostile file (a 2 GB "header", offsets past the end,
overlapping or gapped tensors) must instead end in a :class:`DataError` naming the file. The bytes returned
are then parsed by ``safetensors.torch.load`` (no pickle, no code).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

from ..errors import DataError
from ..validate import is_int
from .json_reader import _check_json_structure, _read_bounded

# Bytes per element of every dtype safetensors writes.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# An adapter file's header lists a few hundred tensors (a few KB); 1 MiB is far above any real one.
HEADER_MAX_BYTES = 1 << 20
# Backbone weights: a ViT-g in float32 is about 4 GB; 64 GiB is far above any backbone avl-peft trains.
WEIGHTS_MAX_BYTES = 64 << 30


def check_safetensors(path: str | Path, *, what: str, max_bytes: int) -> int:
    """Check a safetensors file of at most ``max_bytes`` whose header describes exactly its data; its size.

    Only the header is read. Raises DataError naming ``<what> '<path>'`` when the file is missing, not a
    regular file, too large, or its header is malformed (too long, not a JSON object, unknown dtype, offsets
    outside the data, tensors that overlap, leave gaps or disagree with their shape).
    """
    return _read_header(path, what, max_bytes)[0]


def safetensors_shapes(path: str | Path, *, what: str, max_bytes: int) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a file checked as :func:`check_safetensors` checks it (only the header read).

    A truncated file, one with bytes appended, or a link to a huge unrelated file fails here in
    microseconds, before anything hashes or loads it.
    """
    return _read_header(path, what, max_bytes)[1]


def _read_header(path: str | Path, what: str, max_bytes: int) -> tuple[int, dict[str, tuple[int, ...]]]:
    path = Path(path)
    label = f"{what} '{path}'"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(f"{label} does not exist; check the path") from None
    except OSError as e:
        raise DataError(f"{label} could not be read ({e.strerror or e})") from None
    info = os.fstat(fd)  # before Python wraps the descriptor: a folder would fail there
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DataError(f"{label} is not a regular file; pass the path of a file")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > max_bytes:
            raise DataError(f"{label} is {info.st_size:,} bytes, more than the {max_bytes:,} allowed")
        head = handle.read(8)
        if len(head) < 8:
            raise DataError(f"{label} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(HEADER_MAX_BYTES, info.st_size - 8):
            raise DataError(f"{label}: its header claims {n:,} bytes (file {info.st_size:,}); not a safetensors file")
        raw = handle.read(n)
    return info.st_size, _check_header(raw, label, info.st_size - 8 - n)


def read_safetensors(path: str | Path, *, what: str, max_bytes: int) -> bytes:
    """The bytes of a safetensors file checked by :func:`check_safetensors` (for ``safetensors.torch.load``)."""
    size = check_safetensors(path, what=what, max_bytes=max_bytes)
    data = _read_bounded(Path(path), f"{what} '{path}'", size, DataError)
    check = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    if len(data) != size or check > len(data) - 8:  # the file changed between the two reads
        raise DataError(f"{what} '{path}' changed while it was read; read it again")
    _check_header(data[8 : 8 + check], f"{what} '{path}'", len(data) - 8 - check)
    return data


def _check_header(raw: bytes, label: str, size: int) -> dict[str, tuple[int, ...]]:
    """The shapes in the header ``raw``, checked to describe tensors that tile the ``size`` data bytes exactly."""
    try:
        text = raw.decode("utf-8")
        _check_json_structure(text, label, 4, 100_000)
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{label}: its header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise DataError(f"{label}: its header is not a JSON object")
    spans, shapes = [], {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in _ITEMSIZE
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1] <= size:
            raise DataError(f"{label}: tensor {name!r} has a malformed entry in the header; the file is corrupt")
        if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[entry["dtype"]]:
            raise DataError(f"{label}: tensor {name!r} has {offsets[1] - offsets[0]} bytes for shape {shape}")
        spans.append((offsets[0], offsets[1]))
        shapes[name] = tuple(shape)
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise DataError(f"{label}: the tensors' data overlap or leave a gap at byte {start}; the file is corrupt")
        end = stop
    if end != size:
        raise DataError(f"{label}: {size - end} bytes after the last tensor; the file is corrupt")
    return shapes
