"""avl-peft: low-rank parameter-efficient fine-tuning methods (LoRA, PiSSA, WeGeFT, LoRETTA, InfLoRA, SD-LoRA,
CL-LoRA) as Avalanche continual learners over frozen timm Vision Transformers.

Everything the README's Python examples use is importable from here (``__all__``; a test keeps it true).
``import avl_peft`` loads torch and timm but not Avalanche: the names that need Avalanche (plugins,
scenarios, studies) load on first use (PEP 562 ``__getattr__``), so adapter-only scripts stay light.
"""

from importlib import import_module
from typing import Any

from . import _moved
from .adapters.inject import delta_weights, inject, merge, methods, parameter_counts, trainable_state_dict
from .backbones import create_backbone
from .errors import AvlPeftError, ConfigError, DataError

__version__ = "0.1.0"

_moved.install()  # the module paths of earlier releases forward to the new ones, with a warning

# name -> the module under avl_peft that defines it; loaded when first asked for.
_LAZY = {
    "create_continual_model": "cl.backbone",
    "PEFTPlugin": "cl.plugin",
    "build_scenario": "cl.scenarios",
    "AccuracyMatrixPlugin": "cl.evaluation",
    "make_evaluator": "cl.evaluation",
    "TrainMaskLoss": "cl.loss",
    "StatisticsHeadPlugin": "cl.heads",
    "build_head": "cl.heads",
    "summarize": "instruments.metrics",
    "summarize_both": "instruments.metrics",
    "pretrained_model": "pretrain",
    "run_experiment": "study.experiment",
    "export": "study.export",
    "load_peft": "study.export",
    "load_timm": "study.export",
    "check_base": "study.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'avl_peft' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AccuracyMatrixPlugin",
    "AvlPeftError",
    "ConfigError",
    "DataError",
    "PEFTPlugin",
    "StatisticsHeadPlugin",
    "TrainMaskLoss",
    "build_head",
    "build_scenario",
    "check_base",
    "create_backbone",
    "create_continual_model",
    "delta_weights",
    "export",
    "inject",
    "load_peft",
    "load_timm",
    "make_evaluator",
    "merge",
    "methods",
    "parameter_counts",
    "pretrained_model",
    "run_experiment",
    "summarize",
    "summarize_both",
    "trainable_state_dict",
]
