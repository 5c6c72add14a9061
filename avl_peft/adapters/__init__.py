"""One file per method; importing this package fills the METHODS registry.

Interference control and ``policy: stack`` (model-level, torch only): :mod:`.stack` and :mod:`.interference`.
"""

from . import baselines, cl_lora, inflora, lora, loretta, pissa, sdlora, wegeft  # noqa: F401  (registration side effects)
from .base import INTERFERENCE, METHODS, AdaptedLinear, Adapter, AdapterOptions
from .interference import (
    begin_experience,
    collect_inputs,
    end_experience,
    gpm_update,
    interference_penalty,
    needs_inputs,
    orthogonal_penalty,
)
from .stack import adapter_state_dict, frozen_count, load_adapter_state, stack

__all__ = [
    "INTERFERENCE",
    "METHODS",
    "AdaptedLinear",
    "Adapter",
    "AdapterOptions",
    "adapter_state_dict",
    "begin_experience",
    "collect_inputs",
    "end_experience",
    "frozen_count",
    "gpm_update",
    "interference_penalty",
    "load_adapter_state",
    "needs_inputs",
    "orthogonal_penalty",
    "stack",
]
