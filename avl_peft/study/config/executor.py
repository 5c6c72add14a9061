"""The study's ``executor`` section. It lives with the configuration, below the executors themselves
(:mod:`avl_peft.study.executors`, which run the study and so import a run's whole machinery): the config
only describes where runs execute, and ``executors.py`` checks at import that it registers exactly these names.
"""

from __future__ import annotations

import dataclasses

from ...options import knob

EXECUTOR_NAMES = ("sequential", "local", "ray")


@dataclasses.dataclass(frozen=True)
class ExecutorOptions:
    """The study's ``executor`` section; each executor reads the settings it uses and ignores the rest."""

    name: str = knob("sequential", "where runs execute", choices=EXECUTOR_NAMES)
    workers: int = knob(2, "processes of the local executor", minimum=1, maximum=1024)
    ray_address: str | None = knob(None, "Ray cluster address (null: start Ray locally)")
    num_cpus: int | float = knob(1, "CPUs Ray reserves per run", minimum=0, maximum=1024)
    num_gpus: int | float = knob(0, "GPUs Ray reserves per run (fractions share a GPU)", minimum=0, maximum=1024)
