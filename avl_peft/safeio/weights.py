"""The header of a ``.safetensors`` file, read bounded and checked against the file's size.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name -> dtype, shape,
byte range) and the tensor data. Reading only the header says which tensors a file holds and how large it must
be, so a truncated, padded or foreign file (or a link to a 32 GiB file) is refused in microseconds, before
anything hashes or loads it.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

from ..errors import DataError
from .json_reader import _check_json_structure

# safetensors itself refuses headers above 100 MB; a ViT's header is a few KB (one entry per tensor).
HEADER_MAX_BYTES = 16 << 20
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def safetensors_shapes(path: str | Path, *, what: str = "weights file") -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from the header of the safetensors file at ``path``, checked.

    Raises DataError naming ``<what> '<path>'`` when the file is missing or not a regular file, its header is
    too large, not JSON or inconsistent (a dtype, shape or byte range that does not add up), or the file's
    size differs from the size the header implies (truncated, or something appended).
    """
    path = Path(path)
    label = f"{what} '{path}'"
    fix = "it is truncated or not a safetensors file"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"{label} cannot be opened ({e.strerror}); check the path") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DataError(f"{label} is not a regular file; give the path of a .safetensors file")
    size = info.st_size
    with open(fd, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise DataError(f"{label} is {size} bytes, too short for a safetensors header; {fix}")
        (length,) = struct.unpack("<Q", head)
        if length > min(HEADER_MAX_BYTES, size - 8):
            raise DataError(f"{label} claims a {length:,}-byte header (file: {size:,} bytes); {fix}")
        raw = handle.read(length)
    try:
        text = raw.decode("utf-8")
        _check_json_structure(text, label, max_depth=8, max_items=1_000_000)
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DataError(f"{label} has an unreadable header; {fix}") from None
    if not isinstance(header, dict):
        raise DataError(f"{label} has an unreadable header; {fix}")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, start, stop)):
                raise ValueError
            if stop - start != math.prod(shape) * _DTYPE_BYTES[dtype]:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{label}: the header entry of tensor '{name}' is malformed; {fix}") from None
        shapes[name] = tuple(shape)
        end = max(end, stop)
    if size != 8 + length + end:
        raise DataError(f"{label} is {size:,} bytes but its header describes {8 + length + end:,}; {fix}")
    return shapes
