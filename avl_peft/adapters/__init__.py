"""One file per method; importing this package fills the METHODS registry."""

from . import baselines, lora, loretta, pissa, wegeft  # noqa: F401  (registration side effects)
from .base import METHODS, AdaptedLinear, Adapter, AdapterOptions

__all__ = ["METHODS", "AdaptedLinear", "Adapter", "AdapterOptions"]
