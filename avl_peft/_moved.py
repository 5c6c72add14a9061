"""Module paths that moved: importing an old path still works, for one release, with a DeprecationWarning.

``import avl_peft.backbone`` (the flat layout before the layers) gets a small forwarding module whose names
are looked up, in order, in the modules that now hold them. The table is the one place that knows the old
paths; ``tests/test_public_api.py`` imports each of them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# old path (under avl_peft.) -> the modules (under avl_peft.) that hold its names now, searched in order.
MOVED: dict[str, tuple[str, ...]] = {
    "backbone": ("cl.backbone",),
    "budget": ("adapters.budget",),
    "config": ("study.config", "study.config.schema"),
    "distributed": ("cl.distributed",),
    "evaluation": ("cl.evaluation",),
    "executors": ("study.executors",),
    "metrics": ("instruments.metrics",),
    "peft": ("adapters.inject",),
    "plugin": ("cl.plugin", "cl.checkpoints"),
    "report": ("study.report",),
    "runner": ("study.run_study", "study.attempt"),
    "runstate": ("study.resume",),
    "scenarios": ("cl.scenarios",),
    "study.pretrain": ("pretrain",),
    "study.run": ("study.attempt",),
    "study.runner": ("study.run_study",),
    "cl.glyphs": ("cl.scenarios.glyphs",),
    "study.grid": ("study.config.grid",),
    "study.schema": ("study.config.schema",),
    "study.backbone_checks": ("study.config.backbone_checks",),
    "strategies": ("cl.strategies", "cl.strategies.l2p", "cl.loss"),
    "subspace": ("instruments.geometry", "instruments.tracker"),
}
REMOVED_IN = "0.2"


def _caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside the import machinery and this file: the importer."""
    machinery = ("<frozen", __file__, importlib.__file__)  # import statements; importlib.import_module
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(machinery):
        # warnings.warn itself skips importlib's bootstrap frames when it counts stacklevel
        internal = "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename
        level, frame = level + (not internal), frame.f_back
    return level


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: tuple[str, ...]) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # the default module object; exec_module fills it

    def exec_module(self, module: types.ModuleType) -> None:
        targets = [importlib.import_module(f"avl_peft.{n}") for n in self.new]
        warnings.warn(
            f"avl_peft.{self.old} moved to {' / '.join('avl_peft.' + n for n in self.new)}; import from there (the "
            f"public API: from avl_peft import ...). The old path is removed in avl-peft {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=_caller_stacklevel(),
        )

        def __getattr__(name: str) -> Any:  # noqa: N807 (PEP 562 module attribute hook)
            for target in targets:
                if hasattr(target, name):
                    return getattr(target, name)
            raise AttributeError(f"module 'avl_peft.{self.old}' has no attribute '{name}'")

        def __dir__() -> list[str]:  # noqa: N807
            return sorted({n for t in targets for n in dir(t)})

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        module.__dir__ = __dir__  # type: ignore[method-assign]


class MovedFinder(importlib.abc.MetaPathFinder):
    """Answers only for the old paths in MOVED; real modules are found first (it sits last on sys.meta_path)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix("avl_peft.")
        if fullname.startswith("avl_peft.") and old in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _MovedLoader(old, MOVED[old]))
        return None


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
