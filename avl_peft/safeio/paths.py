"""One safe path component per run id; writes that never follow a symlink below an output root."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from platformdirs import user_cache_dir

from .. import atomic
from ..errors import ConfigError
from .limits import (
    _HASH_CHARS,
    MAX_COMPONENT_CHARS,
)

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._=+-]")


def safe_component(name: str, *, what: str = "run id") -> str:
    """``name`` as one harmless path component: deterministic, never empty, '.', '..' or hidden.

    Characters outside ``A-Za-z0-9._=+-`` (slashes, spaces, non-ASCII, ...) become ``_``, as do leading dots.
    A result longer than :data:`MAX_COMPONENT_CHARS` is cut and ends in ``-`` plus 16 hex digits of the
    SHA-256 of ``name``, so distinct long names stay distinct. Different names can still sanitise to the
    same component (``a b`` and ``a/b``); callers that need uniqueness must deduplicate afterwards.
    Raises ConfigError if ``name`` is empty.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} is empty (got {name!r}); give it a name made of letters, digits, '.', '_' or '-'")
    safe = _UNSAFE_CHARS.sub("_", name)
    stripped = safe.lstrip(".")
    # A leading dot would hide the folder and '.'/'..' would name the current or parent folder.
    safe = "_" * (len(safe) - len(stripped)) + stripped
    if len(safe) > MAX_COMPONENT_CHARS:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
        safe = f"{safe[: MAX_COMPONENT_CHARS - _HASH_CHARS - 1]}-{digest}"
    return safe


def default_out_dir(config_path: str | Path) -> Path:
    """The output folder a study writes to without ``--out``: ``runs/<config file name without suffix>``.

    The name is passed through :func:`safe_component`, so ``...yaml`` (stem ``..``) gives ``runs/__``
    instead of ``runs/..``.
    """
    stem = Path(config_path).stem
    if not stem:
        raise ConfigError(f"config path '{config_path}' has no file name to name the output folder; pass --out")
    return Path("runs") / safe_component(stem, what=f"the name of config file '{config_path}'")


def _relative_parts(root: Path, relative: str | Path) -> tuple[str, ...]:
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise ConfigError(
            f"'{relative}' is not a path inside '{root}' (absolute or containing '..'); refusing to write outside it"
        )
    if not rel.parts:
        raise ConfigError(f"'{relative}' names the folder '{root}' itself, not a file inside it")
    return rel.parts


def safe_write_path(root: str | Path, relative: str | Path) -> Path:
    """``root / relative`` after checking it is safe to write: inside ``root`` and no symlink below it.

    ``root`` itself may be a symlink (the user chose it, e.g. ``--out`` on a scratch disk); every existing
    component below it, the final file included, must not be. Raises ConfigError otherwise. This refuses
    links placed before the call; :func:`write_text_nofollow` also closes the window between check and write.
    """
    root = Path(root)
    path = root
    for part in _relative_parts(root, relative):
        path = path / part
        if path.is_symlink():
            raise ConfigError(
                f"'{path}' is a symbolic link; refusing to write through it (it could point outside '{root}'). "
                "Remove the link or choose another output folder"
            )
    return path


def write_bytes_nofollow(path: str | Path, data: bytes, *, root: str | Path | None = None) -> None:
    """Atomically replace ``path`` with ``data`` without following symlinks below ``root``.

    ``root`` is the folder the caller trusts, e.g. the ``--out`` folder, which may itself be a link to a
    scratch disk; it and the folders between it and the file are created when missing. Without ``root``,
    the parent folder of ``path`` is used and must not itself be a symlink. Folders below the root are
    opened with O_NOFOLLOW, so a symlinked one raises ConfigError. The data go to a new file with a random
    name (O_EXCL: a pre-placed link is never opened) in the target's folder, are flushed to disk and renamed
    over ``path``: rename(2) replaces a symlink at ``path`` by the new file and leaves the link's target
    untouched. All of it happens relative to open folder descriptors, so a link swapped in after the checks
    cannot redirect the write either.
    """
    path = Path(path)
    trust_root = root is not None
    root = Path(root) if root is not None else path.parent
    try:
        # abspath normalises '..' without resolving links, so `root/../x` is caught as outside the root.
        relative = Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        raise ConfigError(f"'{path}' is not inside '{root}'; refusing to write outside it") from None
    parts = _relative_parts(root, relative)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    root.mkdir(parents=True, exist_ok=True)
    directory = _open_folder(root, os.O_RDONLY | os.O_DIRECTORY | (0 if trust_root else nofollow), None)
    try:
        current = root
        for part in parts[:-1]:
            current = current / part
            try:
                os.mkdir(part, 0o777, dir_fd=directory)
            except FileExistsError:
                pass  # an existing folder is fine; a link or a file in its place fails to open below
            child = _open_folder(current, os.O_RDONLY | os.O_DIRECTORY | nofollow, directory)
            os.close(directory)
            directory = child
        atomic.write_in(directory, parts[-1], data)
    finally:
        os.close(directory)


def _open_folder(path: Path, flags: int, dir_fd: int | None) -> int:
    try:
        return os.open(path.name if dir_fd is not None else path, flags, dir_fd=dir_fd)
    except OSError as e:  # ELOOP for a symlink under O_NOFOLLOW, ENOTDIR for a file in the way
        raise ConfigError(
            f"'{path}' is a symbolic link or not a folder ({e.strerror}); refusing to write through it. "
            "Remove it or choose another output folder"
        ) from None


def write_text_nofollow(path: str | Path, text: str, *, root: str | Path | None = None) -> None:
    """:func:`write_bytes_nofollow` for UTF-8 text."""
    write_bytes_nofollow(path, text.encode("utf-8"), root=root)


def check_writable(folder: str | Path, *, fix: str = "choose another with --out") -> None:
    """Create ``folder`` if needed and check a file can be created in it; ConfigError naming it otherwise.

    The probe is a fresh, randomly named file (``O_EXCL | O_NOFOLLOW``, via :func:`tempfile.mkstemp`), so a
    link or pipe planted under a predictable name is never opened, and it is removed at once.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".avl-peft-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"output folder '{folder}' is not writable ({e.strerror or e}); {fix}") from None


def project_cache_dir(*parts: str) -> Path:
    """``$AVL_PEFT_CACHE/<parts>`` if that variable is set, else the user cache folder of ``avl-peft`` (platformdirs:
    ``$XDG_CACHE_HOME/avl-peft``, by default ``~/.cache/avl-peft``, on Linux), not created."""
    root = os.environ.get("AVL_PEFT_CACHE")
    return (Path(root).expanduser() if root else Path(user_cache_dir("avl-peft", appauthor=False))).joinpath(*parts)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (callers bound the size first where it matters)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
