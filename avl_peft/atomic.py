"""Atomic file writes: a temporary file in the same folder, flushed to disk, then renamed over the target.

A kill at any moment leaves either the old file or the new one, never a truncated one. Every result,
checkpoint and state file of avl-peft is written through here.

The temporary file has a random name and is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to an
open descriptor of the folder, so a file or symlink someone placed at a predictable name is never opened,
and rename(2) replaces a symlink at the target itself instead of writing through it: the file a planted
link points to is left untouched. Folders *above* the file are the caller's to trust (see
:mod:`avl_peft.safeio` for writes that must not follow links below an output root).
"""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError


def write_in(directory: int, name: str, data: bytes) -> None:
    """Atomically replace the entry ``name`` of the open folder descriptor ``directory`` with ``data``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):  # a random 48-bit name only collides with a leftover or a hostile file
        tmp = f".{name[:100]}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666, dir_fd=directory)  # 0o666 & ~umask, as open(..., "w") would give
            break
        except FileExistsError:
            continue
    else:
        raise ConfigError(f"could not create a temporary file next to '{name}'; clean up its folder")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=directory)
        except OSError:
            pass
        raise
    try:
        os.fsync(directory)  # makes the rename itself durable; not all filesystems allow it on a folder
    except OSError:
        pass


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        write_in(directory, path.name, data)
    finally:
        os.close(directory)


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
