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

Reading JSON (:func:`load_json`): size from the file's metadata before reading,
then a pre-scan with regular expressions (strings blanked out) bounds nesting and the number of values
before :func:`json.loads`, whose C scanner recurses. ``NaN``/``Infinity`` stay allowed: a diverged run
legitimately records a NaN metric.

Reading safetensors (:func:`check_safetensors`, :func:`read_safetensors`, :func:`safetensors_shapes`):
bounded size, and the header (length, dtypes, shapes, offsets that tile the data exactly) checked before any
tensor is built or the file hashed.

Images (:mod:`.images`): one lister and one opener for user image folders, with an allow-list of decoders
and a pixel budget checked before decoding. Locks (:mod:`.locks`): one folder lock (filelock) naming its
holder.

Writing: :func:`safe_component` turns run ids and config names into one harmless path component,
:func:`safe_write_path` refuses symlinks below an output root, and :func:`write_text_nofollow` writes
atomically without ever following a symlink below the root.
"""

from .json_reader import load_json
from .limits import (
    JSON_MAX_BYTES,
    JSON_MAX_DEPTH,
    JSON_MAX_ITEMS,
    MAX_COMPONENT_CHARS,
    YAML_MAX_BYTES,
    YAML_MAX_DEPTH,
    YAML_MAX_NODES,
)
from .paths import (
    check_writable,
    default_out_dir,
    file_sha256,
    project_cache_dir,
    safe_component,
    safe_write_path,
    write_bytes_nofollow,
    write_text_nofollow,
)
from .safetensors_reader import check_safetensors, read_safetensors, safetensors_shapes
from .yaml_reader import load_yaml, parse_yaml

__all__ = [
    "file_sha256",
    "JSON_MAX_BYTES",
    "JSON_MAX_DEPTH",
    "JSON_MAX_ITEMS",
    "MAX_COMPONENT_CHARS",
    "YAML_MAX_BYTES",
    "YAML_MAX_DEPTH",
    "YAML_MAX_NODES",
    "check_safetensors",
    "check_writable",
    "default_out_dir",
    "load_json",
    "load_yaml",
    "parse_yaml",
    "project_cache_dir",
    "read_safetensors",
    "safe_component",
    "safe_write_path",
    "safetensors_shapes",
    "write_bytes_nofollow",
    "write_text_nofollow",
]
