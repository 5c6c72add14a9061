"""Name -> object registries with "did you mean ...?" errors (methods, scenarios, strategies)."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}
        self._origins: dict[str, str] = {}

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        origin = sys._getframe(1).f_code.co_filename  # the file that registers: the only one that may name it

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            self._origins[name] = origin
            doc = description or (getattr(obj, "__doc__", "") or "").strip().splitlines()[0:1]
            self._docs[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove an entry (for plugins registered temporarily, e.g. in tests)."""
        self.get(name)
        del self._items[name], self._docs[name]

    def get(self, name: str) -> T:
        if name not in self._items:
            names = self.names()
            raise ConfigError(f"unknown {self.kind} '{name}'. Available: {', '.join(names)}.{suggest(name, names)}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)

    def origin(self, name: str) -> str:
        """Path of the file that registered ``name``."""
        return self._origins[name]

    def describe(self) -> dict[str, str]:
        return {n: self._docs[n] for n in self.names()}
