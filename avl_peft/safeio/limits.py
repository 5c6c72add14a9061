"""The bounds of the strict readers (why each value: docs in the constants' comments)."""

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
