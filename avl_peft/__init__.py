"""avl-peft: low-rank parameter-efficient fine-tuning (LoRA, PiSSA, WeGeFT, LoRETTA) as Avalanche
continual learners over frozen timm Vision Transformers."""

from importlib import import_module
from typing import Any

from .adapters.inject import delta_weights, inject, merge, methods, parameter_counts, trainable_state_dict
from .backbones import create_backbone
from .errors import AvlPeftError, ConfigError, DataError

__version__ = "0.1.0"

# Avalanche-side names load on first use, so `import avl_peft` stays light for adapter-only users.
_LAZY = {
    "PEFTPlugin": "cl.plugin",
    "build_scenario": "cl.scenarios",
    "summarize": "instruments.metrics",
    "summarize_both": "instruments.metrics",
    "run_experiment": "study.experiment",
    "export": "study.export",
    "load_peft": "study.export",
    "load_timm": "study.export",
    "check_base": "study.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'avl_peft' has no attribute '{name}'")


__all__ = [
    "AvlPeftError",
    "ConfigError",
    "DataError",
    "PEFTPlugin",
    "build_scenario",
    "check_base",
    "create_backbone",
    "delta_weights",
    "export",
    "inject",
    "load_peft",
    "load_timm",
    "merge",
    "methods",
    "parameter_counts",
    "run_experiment",
    "summarize",
    "summarize_both",
    "trainable_state_dict",
]
