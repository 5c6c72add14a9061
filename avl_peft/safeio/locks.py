"""One folder lock for run folders and pretrain outputs: ``<folder>/.lock`` held with :mod:`filelock`.

filelock takes an OS lock (``flock`` on POSIX) that the kernel releases when its holder dies, even by
SIGKILL, so a stale lock never blocks anyone; it refuses to open a lock file that is a symbolic link. On top
of it this module refuses a lock file that is not a regular file (a FIFO, a device) and records the holder,
``pid N on HOST``, inside the lock file so that others can say who holds it (:func:`lock_holder`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import filelock

from ..errors import ConfigError

LOCK_NAME = ".lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, blocking: bool, what: str = "folder") -> Iterator[bool]:
    """Hold ``<folder>/.lock``; yields True, or False at once if ``blocking`` is False and another holds it.

    ``folder`` is created if missing. The lock file must be absent or a regular file: a symbolic link, pipe
    or device raises ConfigError naming it (``what`` says what the folder is, e.g. ``run folder``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise ConfigError(f"'{path}' cannot be examined ({e.strerror}); remove it") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise ConfigError(
            f"'{path}' (the lock of {what} '{folder}') is a symbolic link or not a regular file; remove it"
        )
    lock = filelock.FileLock(path, timeout=-1 if blocking else 0)
    try:
        lock.acquire()
    except filelock.Timeout:
        yield False
        return
    except OSError as e:  # ELOOP: a link planted between the check and the open; EACCES, EROFS
        raise ConfigError(
            f"'{path}' (the lock of {what} '{folder}') cannot be opened ({e.strerror}); remove it"
        ) from None
    try:
        _write_holder(path, f"pid {os.getpid()} on {socket.gethostname()}\n")
        yield True
    finally:
        _write_holder(path, "")  # no holder any more (a SIGKILLed holder leaves its line: see lock_holder)
        lock.release()


def _write_holder(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | _NOFOLLOW)
    except OSError:
        return  # the line is for messages only
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
    finally:
        os.close(fd)


def lock_holder(folder: str | Path) -> str | None:
    """Who holds ``<folder>/.lock`` now, as its holder wrote it (``pid N on HOST``), or None if nobody seems to.

    For messages only (the lock itself is the OS lock): a holder on this host whose process is gone is ignored.
    """
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            text = os.read(fd, 200).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
    except OSError:
        return None
    parts = text.split()
    if len(parts) != 4 or parts[0] != "pid" or not parts[1].isdigit():
        return None
    if parts[3] == socket.gethostname():
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass  # alive, owned by someone else
    return text
