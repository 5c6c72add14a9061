"""Strict, bounded YAML: duplicate and non-string keys refused, depth and alias expansion bounded."""

from __future__ import annotations

import collections
import numbers
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

from ..errors import ConfigError
from .json_reader import _read_bounded
from .limits import (
    _MERGE_TAG,
    YAML_MAX_BYTES,
    YAML_MAX_DEPTH,
    YAML_MAX_NODES,
)


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
