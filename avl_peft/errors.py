"""Exception types. Every user-facing failure is one of these, with a message that says what to do."""


class AvlPeftError(Exception):
    """Base class of avl-peft's own errors (the CLI turns them into exit code 2, no traceback)."""


class ConfigError(AvlPeftError, ValueError):
    """A bad argument or configuration value: the message names the key, what is allowed and the fix."""


class DataError(AvlPeftError, RuntimeError):
    """A dataset or file is missing/unreadable: the message names it, where we looked and how to get it."""


def key_summary(groups: list[tuple[str, list[str]]]) -> str:
    """``label: k1, k2, k3, k4 …; label2: …`` for the non-empty groups: the one format of a state dict that
    does not fit a model (checkpoint loaders, saved adapter states), four keys per group at most."""
    return "; ".join(f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}" for label, keys in groups if keys)
