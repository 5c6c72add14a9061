"""avl-peft: low-rank parameter-efficient fine-tuning (LoRA, PiSSA, WeGeFT, LoRETTA) as Avalanche
continual learners over frozen timm Vision Transformers."""

from .backbone import create_backbone
from .errors import AvlPeftError, ConfigError, DataError
from .peft import delta_weights, inject, merge, methods, parameter_counts, trainable_state_dict

__version__ = "0.1.0"

__all__ = [
    "AvlPeftError",
    "ConfigError",
    "DataError",
    "create_backbone",
    "delta_weights",
    "inject",
    "merge",
    "methods",
    "parameter_counts",
    "trainable_state_dict",
]
