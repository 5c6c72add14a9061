"""Atomic file writes: a temporary file in the same folder, flushed to disk, then renamed over the target.

A kill at any moment leaves either the old file or the new one, never a truncated one. Every result,
checkpoint and state file of avl-peft is written through here.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float))


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_torch(obj: Any, path: Path) -> None:
    write_bytes(path, torch_bytes(obj))
