"""A study: one base run plus ``grid`` (cartesian axes) and ``variants`` (override sets), expanded to runs.

Both use dotted keys into the base run (``method.options.rank``, ``training.lr``). :func:`load_study`
reads a YAML file (safely: see :mod:`avl_peft.safeio`), applies ``--set`` overrides, validates the study
and every run it expands to, so a typo anywhere fails before anything trains.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import warnings
from pathlib import Path
from typing import Any

import yaml

from ...adapters import METHODS
from ...cl.training import resolve_device
from ...errors import ConfigError
from ...safeio import load_yaml, parse_yaml, safe_component
from .schema import (
    STUDY_ONLY,
    accepts,
    as_config,
    default,
    field_at,
    get_dotted,
    known_options,
    parse_run,
    parse_study,
    set_dotted,
)


def _check_overrides(where: str, overrides: Any, *, lists: bool) -> None:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: must be a mapping of dotted keys to {'lists of values' if lists else 'values'}")
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            # YAML files and --set values are refused earlier (safeio); this guards studies built in Python.
            raise ConfigError(f"{where}: key {key!r} is not a dotted key like 'training.lr'; keys must be strings")
        if key.split(".")[0] in STUDY_ONLY:
            raise ConfigError(f"{where}: '{key}' is a study setting and cannot vary between runs")
        field_at(str(key))
        if lists and (not isinstance(value, list) or not value):
            raise ConfigError(f"{where}.{key}: must be a non-empty list of values, got {value!r}")


def run_id(cfg: dict, axes: list[str]) -> str:
    """Readable, unique id from the method, its options, the strategy, varied axes and the seed."""
    parts = [cfg["method"]["name"]]
    parts += [f"{k}{v}" for k, v in sorted(cfg["method"]["options"].items())]
    if cfg["method"]["policy"] != "continue":  # the default policy stays out of ids (they stay as they were)
        parts.append(cfg["method"]["policy"])
    parts.append(cfg["strategy"]["name"])
    if cfg.get("budget") is not None:
        parts.append(f"budget{cfg['budget']}")
    for key in axes:
        if key.startswith(("method.", "strategy.name", "seed", "budget", "search")):  # a search: in results.json
            continue
        parts.append(f"{key.split('.')[-1]}{get_dotted(cfg, key)}")
    parts.append(f"s{cfg['seed']}")
    # Characters that are unsafe in a file name are dropped (ids stay what they were for --resume), then the
    # id is made one harmless path component: never '..' or hidden, long ids cut and suffixed with a hash.
    return safe_component(re.sub(r"[^A-Za-z0-9._=+-]", "", "-".join(str(p) for p in parts)))


def expand(study: dict) -> list[tuple[str, dict]]:
    """All runs of a validated study: (run id, resolved config), duplicates removed, order stable."""
    grid, variants = study["grid"], study["variants"] or [{}]
    base = {k: v for k, v in study.items() if k not in STUDY_ONLY}
    axes = list(grid) + sorted({k for v in variants for k in v})
    runs, seen = [], set()
    for values in itertools.product(*grid.values()):
        for variant in variants:
            cfg = copy.deepcopy(base)
            overrides = [*zip(grid, values), *variant.items()]
            for key, value in overrides:
                set_dotted(cfg, key, copy.deepcopy(value))
            # When a grid axis or variant changes the method, options it inherited (from the base run or
            # a rank axis) that the new method does not take are dropped — e.g. a rank axis crossed with
            # full/head. Options a variant sets explicitly, and everything in a run whose method was not
            # overridden, are checked strictly.
            keys = {k for k, _ in overrides}
            explicit = {k for k in variant if k.startswith("method.options")}
            lenient = ({"method.name"} & keys or {k for k in grid if k.startswith("method.options.")}) and (
                "method.options" not in explicit
            )
            options = (cfg.get("method") or {}).get("options")
            if lenient and isinstance(options, dict):
                method = cfg["method"].get("name", default("method.name"))
                cfg["method"]["options"] = {
                    k: v
                    for k, v in options.items()
                    if f"method.options.{k}" in explicit or accepts(method, k) or k not in known_options()
                }
            run = parse_run(cfg)
            if run.budget is not None:  # the budget chooses the method's budget knobs; drop configured ones
                knobs = METHODS.get(run.method.name).budget_knobs if run.method.name in METHODS else ()
                options = {k: v for k, v in run.method.options.items() if k not in knobs}
                run = dataclasses.replace(run, method=dataclasses.replace(run.method, options=options))
            run.check()
            cfg = run.mapping
            rid = run_id(cfg, axes)
            key = yaml.safe_dump(cfg, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            runs.append((rid, cfg))
    ids = [r for r, _ in runs]
    dupes = {r for r in ids if ids.count(r) > 1}
    if dupes:
        runs = [(f"{rid}-{i}" if rid in dupes else rid, cfg) for i, (rid, cfg) in enumerate(runs)]
    return runs


def validate_study(data: Any, *, dry_run: bool = False) -> dict:
    """Validate a whole study (top-level mapping from YAML) and every run it expands to.

    ``dry_run``: a device this machine lacks (a study written for a GPU, checked on a laptop) is a warning,
    not an error; everything else about the runs is checked as for a real run.
    """
    study = as_config(parse_study(data))
    _check_overrides("grid", study["grid"], lists=True)
    for i, variant in enumerate(study["variants"]):
        _check_overrides(f"variants[{i}]", variant, lists=False)
    from ..report.claims import check_claims  # here: the report and the search import this package
    from ..search import check_search

    check_claims(study["claims"])
    runs = expand(study)  # every run must validate before anything trains
    for _, cfg in runs:
        check_search(cfg)  # every trial of a validation search too
    executor = study["executor"]
    if not (executor["name"] == "ray" and executor["ray_address"]):  # a remote cluster has its own devices
        for device in sorted({cfg["training"]["device"] for _, cfg in runs}):
            try:
                resolve_device(device)  # cuda/mps that torch does not see here: refused now, not at run time
            except ConfigError as e:
                if not dry_run:
                    raise
                warnings.warn(f"{e} (the runs are valid; train them where {device} is, or override it)", stacklevel=2)
    return study


def apply_set(data: dict, assignments: list[str]) -> dict:
    """Apply ``--set key=value`` (value parsed as YAML) to the raw config mapping."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: must be a mapping of keys to values, got {type(data).__name__}")
    data = copy.deepcopy(data or {})
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set training.lr=0.001")
        if key.startswith("grid."):
            field_at(key[5:])  # the axis must be a real key; an empty one is named here, not later
        elif not key.startswith("variants"):
            field_at(key)
        # The same bounded, strict reader as config files: no alias bombs, no deep nesting, no python tags,
        # no duplicate or non-string keys.
        value = parse_yaml(raw, what=f"--set {key}")
        if key.startswith("grid."):
            grid = data.setdefault("grid", {})
            if not isinstance(grid, dict):
                raise ConfigError(f"--set {key}: 'grid' in the config is not a mapping, so no axis can be added")
            grid[key[5:]] = value
        else:
            set_dotted(data, key, value)
    return data


def _anchor_paths(data: Any, folder: Path) -> None:
    """A relative ``backbone.pretrain`` names a file next to the study YAML (configs point at each other)."""
    backbone = data.get("backbone") if isinstance(data, dict) else None
    pretrain = backbone.get("pretrain") if isinstance(backbone, dict) else None
    if isinstance(pretrain, str) and not Path(pretrain).expanduser().is_absolute():
        candidate = folder / pretrain
        if candidate.is_file():
            backbone["pretrain"] = str(candidate)


def load_study(path: str | Path, assignments: list[str] | None = None, *, dry_run: bool = False) -> dict:
    data = load_yaml(path, what="config")
    _anchor_paths(data, Path(path).parent)
    if data is None or data == {}:
        # An empty file would otherwise plan and run the whole default study.
        raise ConfigError(
            f"config file '{path}' is empty; write the settings that differ from the defaults (at least "
            "method.name), see configs/ for examples"
        )
    if isinstance(data, dict) and "data" in data and not {"scenario", "method", "strategy"} & set(data):
        # `data:` is the pretrain config's own section; a study has none.
        raise ConfigError(
            f"'{path}' is a pretrain config (it has a data: section), not a study; build the backbone with "
            f"`avl-peft pretrain {path}`, or name it in a study as backbone.pretrain: {path}"
        )
    return validate_study(apply_set(data, assignments or []), dry_run=dry_run)
