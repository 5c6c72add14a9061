"""Bounded, strict readers for YAML/JSON and symlink-safe paths and writes for untrusted files.

Config files and ``results.json`` files are written by people and by other processes, so a malicious or
broken one must end in a :class:`ConfigError`/:class:`DataError` that names the file and the fix, never in a
MemoryError, RecursionError, AttributeError or a write outside the output folder. This module is a core
layer: it depends only on the standard library, PyYAML, :mod:`avl_peft.errors` and :mod:`avl_peft.atomic`
(whose random-named, ``O_EXCL | O_NOFOLLOW`` temporary file and rename do the final write).

Reading YAML (:func:`load_yaml`, :func:`parse_yaml`):

* size: at most ``max_bytes`` (checked on the open file, then by reading at most one byte more);
* depth: the event stream is produced by PyYAML's parser, which is iterative, and checked *before* the
  (recursive) composer sees it, so a 100,000-deep ``[[[[`` fails after ~64 levels instead of blowing the
  stack; the checked events are then replayed to the composer, so the text is parsed only once;
* aliases: the same pre-scan counts nodes and scalar characters *with* alias re-use, so a "billion laughs"
  file stops at the first level that crosses ``max_nodes``; recursive aliases are refused;
* keys: duplicate keys (YAML keeps the last one silently) and non-string keys (``1:``, ``null:``, ``on:``,
  ``? [a, b]``) are refused with the key and its line.

Reading JSON (:func:`load_json`, :func:`load_json_or_none`): size from the file's metadata before reading,
then a pre-scan with regular expressions (strings blanked out) bounds nesting and the number of values
before :func:`json.loads`, whose C scanner recurses. ``NaN``/``Infinity`` stay allowed: a diverged run
legitimately records a NaN metric.

Writing: :func:`safe_component` turns run ids and config names into one harmless path component,
:func:`safe_write_path` refuses symlinks below an output root, and :func:`write_text_nofollow` writes
atomically without ever following a symlink below the root.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import numbers
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    Event,
    NodeEvent,
    ScalarEvent,
)
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from avl_peft import atomic
from avl_peft.errors import ConfigError, DataError

__all__ = [
    "JSON_MAX_BYTES",
    "JSON_MAX_DEPTH",
    "JSON_MAX_ITEMS",
    "MAX_COMPONENT_CHARS",
    "YAML_MAX_BYTES",
    "YAML_MAX_DEPTH",
    "YAML_MAX_NODES",
    "check_finite",
    "default_out_dir",
    "load_json",
    "load_json_or_none",
    "load_yaml",
    "parse_yaml",
    "safe_component",
    "safe_write_path",
    "write_bytes_nofollow",
    "write_text_nofollow",
]

# A real study config is a few KB; 1 MiB leaves room for thousands of variants while keeping the worst case
# (pure-Python parse of a maximal file) at a few seconds.
YAML_MAX_BYTES = 1 << 20
# Configs nest about 5 levels (study > variants > variant > list > ...). 64 is far above that and far below
# the recursion limit: the composer, copy.deepcopy and yaml.safe_dump in config.expand each spend 2-3 stack
# frames per level, and callers may already be a few hundred frames deep (pytest, executors).
YAML_MAX_DEPTH = 64
# Nodes after alias expansion. A config has hundreds; 100,000 still allows a huge grid, and a billion-laughs
# file crosses it on its fifth level, in milliseconds.
YAML_MAX_NODES = 100_000

# results.json holds two T x T accuracy matrices plus per-experience diagnostics and the run's config;
# 32 MiB and 500,000 values fit T in the hundreds, while a 1500 x 1500 matrix (2.25 M values) is refused.
JSON_MAX_BYTES = 32 << 20
JSON_MAX_ITEMS = 500_000
# results.json embeds the run's config one level down, so this must exceed YAML_MAX_DEPTH; json.loads
# recurses in C with the interpreter's recursion check, so it must also stay well under the limit.
JSON_MAX_DEPTH = 100

# Linux and macOS allow 255 bytes per name; 200 leaves room for the '.name.<random>.tmp' files that atomic
# writes create next to a file named after a component.
MAX_COMPONENT_CHARS = 200
_HASH_CHARS = 16

_MERGE_TAG = "tag:yaml.org,2002:merge"


# ----------------------------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that composes from a pre-checked, buffered event list and refuses ambiguous keys.

    ``label`` names the source in error messages (``config file 'x.yaml'``, ``--set training.lr``).
    """

    def __init__(self, text: str, label: str) -> None:
        super().__init__(text)
        self.label = label
        # None while the parser produces events for the pre-scan; a deque once they are replayed.
        self._replay: collections.deque[Event] | None = None

    # The composer pulls events through these three methods; during replay they read the checked buffer.
    def check_event(self, *choices: type) -> bool:
        if self._replay is None:
            return super().check_event(*choices)
        if not self._replay:
            return False
        return not choices or isinstance(self._replay[0], choices)

    def peek_event(self) -> Event | None:
        if self._replay is None:
            return super().peek_event()
        return self._replay[0] if self._replay else None

    def get_event(self) -> Event | None:
        if self._replay is None:
            return super().get_event()
        return self._replay.popleft() if self._replay else None

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        self._check_keys(node)
        for key_node, value_node in node.value:
            # Explicit keys are checked above; a merge (`<<: {...}` or `<<: [*a, *b]`) brings the keys of
            # its sources, and an inline source is never constructed on its own, so check those here.
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    if isinstance(source, MappingNode):
                        self._check_keys(source)
        return super().construct_mapping(node, deep=deep)

    def _check_keys(self, node: MappingNode) -> None:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # '<<' merges defaults; keys written next to it override them, which is intended
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                kind = "list" if isinstance(key_node, SequenceNode) else "mapping"
                raise ConfigError(
                    f"{self.label}: the key on line {line} is a {kind}; keys must be plain strings "
                    "(a '? ' complex key or a bracketed key is not allowed)"
                )
            key = self.construct_object(key_node)
            if not isinstance(key, str):
                raise ConfigError(
                    f"{self.label}: key {key_node.value!r} on line {line} is read as {_yaml_kind(key)}, not a "
                    f'string; quote it ("{key_node.value}":) if you meant the text. YAML reads 1, 1.5, null, ~, '
                    "an empty key, true/false and yes/no/on/off as non-strings"
                )
            if key in first_line:
                raise ConfigError(
                    f"{self.label}: duplicate key '{key}' on line {line} (first on line {first_line[key]}); "
                    "YAML would silently keep only the last one, so remove or rename one of them"
                )
            first_line[key] = line


def _yaml_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, numbers.Number):
        return f"the number {value!r}"
    return f"a {type(value).__name__}"


def _prescan(loader: _StrictLoader, max_bytes: int, max_depth: int, max_nodes: int) -> list[Event]:
    """Pull every event from the parser, enforcing depth and expanded size; return them for replay.

    Sizes are counted with aliases expanded: an alias adds the node count and scalar characters of the node
    it names, exactly what constructing and then copying or dumping the data would cost. The expanded text
    may not exceed ``max_bytes`` (no more than a plain file could hold), the expanded nodes ``max_nodes``.
    """
    events: list[Event] = []
    depth = nodes = chars = 0
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, chars) of the finished node it names
    open_collections: list[tuple[str | None, int, int]] = []  # (anchor, nodes, chars) at its start
    open_anchors: set[str] = set()
    while loader.check_event():
        event = loader.get_event()
        events.append(event)
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, DocumentStartEvent):
            sizes.clear()  # anchors are scoped to one document
        elif isinstance(event, ScalarEvent):
            nodes += 1
            chars += len(event.value)
            if event.anchor is not None:
                sizes[event.anchor] = (1, len(event.value))
        elif isinstance(event, CollectionStartEvent):
            depth += 1
            if depth > max_depth:
                raise ConfigError(
                    f"{loader.label}: nesting deeper than {max_depth} levels on line {line}; a config never "
                    "needs that many, so flatten the structure"
                )
            open_collections.append((event.anchor, nodes, chars))
            if event.anchor is not None:
                open_anchors.add(event.anchor)
            nodes += 1
        elif isinstance(event, CollectionEndEvent):
            depth -= 1
            anchor, nodes_before, chars_before = open_collections.pop()
            if anchor is not None:
                open_anchors.discard(anchor)
                sizes[anchor] = (nodes - nodes_before, chars - chars_before)
        elif isinstance(event, AliasEvent):
            if event.anchor in open_anchors:
                raise ConfigError(
                    f"{loader.label}: alias *{event.anchor} on line {line} refers to the collection that contains "
                    "it; recursive structures are not allowed, so copy the values instead"
                )
            if event.anchor not in sizes:
                raise ConfigError(
                    f"{loader.label}: alias *{event.anchor} on line {line} has no matching &{event.anchor} "
                    "anchor before it; define the anchor first or write the value out"
                )
            alias_nodes, alias_chars = sizes[event.anchor]
            nodes += alias_nodes
            chars += alias_chars
        if isinstance(event, NodeEvent) and (nodes > max_nodes or chars > max_bytes):
            what = f"{max_nodes:,} values" if nodes > max_nodes else f"{max_bytes:,} characters of text"
            raise ConfigError(
                f"{loader.label}: expands to more than {what} by line {line} (anchors and *aliases count each "
                "time they are used); write a smaller config or use fewer aliases"
            )
    return events


def _load_yaml_text(text: str, label: str, *, name: str, max_bytes: int, max_depth: int, max_nodes: int) -> Any:
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text, label)  # the Reader refuses control characters right here
        loader.name = name  # the Reader stamps this on every mark, so PyYAML's own messages name the file
        events = _prescan(loader, max_bytes, max_depth, max_nodes)
        loader._replay = collections.deque(events)
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"{label} is not valid YAML: {e}") from None
    except (ValueError, TypeError, OverflowError) as e:
        # Scalars that match a YAML type but not its range, e.g. a 5,000-digit integer (Python refuses to
        # convert it) or the timestamp 2001-13-45.
        raise ConfigError(f"{label}: a value cannot be read ({e}); quote it to keep it as text") from None
    except RecursionError:
        # Depth is bounded above, so only a pathological chain of '<<' merges can get here.
        raise ConfigError(f"{label}: the structure is too deeply nested to read; simplify its '<<' merges") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(
    source: str | Path,
    *,
    what: str = "config",
    max_bytes: int = YAML_MAX_BYTES,
    max_depth: int = YAML_MAX_DEPTH,
    max_nodes: int = YAML_MAX_NODES,
) -> Any:
    """Read the YAML file at ``source`` like :func:`yaml.safe_load`, refusing hostile or ambiguous content.

    Returns None for an empty file (or one holding only comments); callers decide whether that is allowed.
    Raises ConfigError naming ``<what> file '<path>'`` for: a missing or non-regular file, more than
    ``max_bytes`` bytes, text that is not UTF-8, invalid YAML, more than one document, nesting deeper than
    ``max_depth``, more than ``max_nodes`` values or ``max_bytes`` characters once aliases are expanded,
    recursive aliases, duplicate keys and non-string keys.
    """
    path = Path(source)
    label = f"{what} file '{path}'"
    data = _read_bounded(path, label, max_bytes, ConfigError)
    try:
        text = data.decode("utf-8-sig")  # a BOM from Windows editors is harmless; drop it
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    return _load_yaml_text(text, label, name=str(path), max_bytes=max_bytes, max_depth=max_depth, max_nodes=max_nodes)


def parse_yaml(
    text: str,
    *,
    what: str = "value",
    max_bytes: int = YAML_MAX_BYTES,
    max_depth: int = YAML_MAX_DEPTH,
    max_nodes: int = YAML_MAX_NODES,
) -> Any:
    """Parse YAML text (e.g. the value of ``--set key=value``) with the same limits as :func:`load_yaml`.

    ``what`` starts every error message, e.g. ``--set training.lr``.
    """
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ConfigError(f"{what}: longer than {max_bytes:,} bytes; shorten it")
    return _load_yaml_text(text, what, name=what, max_bytes=max_bytes, max_depth=max_depth, max_nodes=max_nodes)


def check_finite(value: Any, key: str) -> Any:
    """Return ``value``; raise ConfigError if it is a NaN or infinite number (``.nan``, ``.inf``, ``1e999``).

    Anything else, including non-numbers, passes through: the type is the schema's to check.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------- JSON

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


def load_json_or_none(
    path: str | Path,
    *,
    what: str = "results file",
    max_bytes: int = JSON_MAX_BYTES,
    max_depth: int = JSON_MAX_DEPTH,
    max_items: int = JSON_MAX_ITEMS,
) -> tuple[Any | None, str | None]:
    """:func:`load_json` for callers that report and skip bad files: ``(data, None)`` or ``(None, problem)``.

    ``problem`` is the full DataError message (it names the file). A JSON ``null`` document gives
    ``(None, None)``.
    """
    try:
        return load_json(path, what=what, max_bytes=max_bytes, max_depth=max_depth, max_items=max_items), None
    except DataError as e:
        return None, str(e)


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


# ---------------------------------------------------------------------------------------------- paths

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
