"""The run configuration: the typed study and run dataclasses (:mod:`.schema`), the study's expansion into
runs (:mod:`.grid`) and the backbone's weight and budget checks (:mod:`.backbone_checks`)."""

from .grid import apply_set, expand, load_study, validate_study

__all__ = ["apply_set", "expand", "load_study", "validate_study"]
