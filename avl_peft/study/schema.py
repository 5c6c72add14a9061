"""The run configuration schema: every key, its type, default and reason, and the checks of one run.

Everything is validated before anything trains: unknown keys, wrong types, out-of-range values and
impossible combinations raise ConfigError naming the key, what is allowed and, for typos, the closest
valid key. Checks that belong to a method, strategy or scenario live on their registry entries and are
called from here; :mod:`.grid` expands a study into runs and validates each with :func:`check_run`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings
from typing import Any

import torch

from ..adapters import METHODS
from ..adapters.base import parse_options
from ..cl.backbone import data_config
from ..cl.heads import head_options
from ..cl.plugin import POLICIES, check_policy
from ..cl.precision import PRECISIONS, check_precision
from ..cl.scenarios import SCENARIOS, check_counts, check_scenario_options
from ..cl.strategies import STRATEGIES, strategy_options
from ..errors import ConfigError
from ..hardware import PrecisionWarning, resolve_precision
from ..options import option_names
from ..registry import suggest
from .backbone_checks import _check_backbone, _check_budget, meta_model
from .upstream import check_upstream


@dataclasses.dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    default: Any = None
    doc: str = ""
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False
    exclusive_min: bool = False


def F(types, default=None, doc="", **kw) -> Field:
    return Field(types if isinstance(types, tuple) else (types,), default, doc, **kw)


NUM = (int, float)
# Values training.head took before it chose the classifier; refused with the new spelling (check_run).
LEGACY_HEADS = ("incremental", "multi")
PRECISION_NAMES = ("auto", *PRECISIONS)
SEARCH_METRICS = ("avg_incremental_acc", "til_acc", "bwt", "forgetting", "til_forgetting")  # besides acc

# The schema: section -> key -> Field. Defaults are the quickstart-scale choices; each has its reason.
# Upper bounds (``maximum``) are there to catch typos (an extra ten zeros), not to limit real studies: each
# is far above any sensible value (10,000 epochs or experiences, a million images per batch, 1,024 workers,
# 10^12 adapter parameters); the seed's is numpy's (2^32 - 1). Every number must also be finite: YAML's
# .nan/.inf pass every < and > comparison, so they are refused by name (see _check_value and check_run).
SCHEMA: dict[str, Any] = {
    "name": F(str, "study", "study name, used in the report title"),
    "seed": F(int, 0, "seeds the class order, initialisation and data order", minimum=0, maximum=2**32 - 1),
    "backbone": {
        "name": F(str, "vit_tiny_patch16_224", "timm model, with its full tag for pretrained weights"),
        "pretrained": F(bool, False, "download timm's pretrained weights (needs network)"),
        "checkpoint": F(
            str,
            None,
            "local .pth/.safetensors state dict or `avl-peft pretrain` folder (offline weights)",
            nullable=True,
        ),
        "pretrain": F(
            str,
            None,
            "pretrain YAML (e.g. configs/pretrain_glyphs.yaml): the backbone is built once and reused from the cache",
            nullable=True,
        ),
        "kwargs": F(dict, {}, "extra timm.create_model arguments, e.g. img_size, patch_size, depth"),
    },
    "scenario": {
        "name": F(str, "digits", "a scenario from `avl-peft list`"),
        "n_experiences": F(
            int, None, "number of experiences (null: the scenario's default)", minimum=1, maximum=10_000, nullable=True
        ),
        "root": F(str, None, "dataset folder (null: the scenario's default)", nullable=True),
        "options": F(dict, {}, "scenario-specific options"),
    },
    "training": {
        "optimizer": F(str, "adamw", "optimizer", choices=("sgd", "adam", "adamw")),
        "lr": F(
            NUM, 1e-3, "learning rate (methods differ: sweep it for fair comparisons)", minimum=0, exclusive_min=True
        ),
        "weight_decay": F(NUM, 0.0, "weight decay", minimum=0),
        "momentum": F(NUM, 0.9, "SGD momentum", minimum=0, maximum=1),
        "epochs": F(int, 1, "epochs per experience", minimum=1, maximum=10_000),
        "batch_size": F(int, 32, "training mini-batch size", minimum=1, maximum=1_000_000),
        "eval_batch_size": F(int, 128, "evaluation mini-batch size", minimum=1, maximum=1_000_000),
        "device": F(str, "cpu", "cpu, cuda, cuda:N, mps or auto; must be available on this machine"),
        "train_mask": F(str, "current", "logits entering the training loss", choices=("current", "seen")),
        "head": F(
            str,
            "linear",
            "classifier for class-incremental evaluation: the trained linear head, or a statistics head on the "
            "backbone's features without class-incremental bias",
            choices=("linear", "prototype", "ranpac", *LEGACY_HEADS),
        ),
        "head_options": F(
            dict,
            {},
            "options of the head (ranpac: dim, lambdas, val_fraction; every head: align, drift, covariance, "
            "covariance_rank)",
        ),
        "task_incremental": F(bool, False, "one head per task (Avalanche MultiHeadClassifier) with task labels"),
        "pretrain": F(bool, False, "base session: train experience 0 with full fine-tuning"),
        "pretrain_epochs": F(
            int, None, "epochs of the base session (null: epochs)", minimum=1, maximum=10_000, nullable=True
        ),
        "pretrain_lr": F(NUM, None, "lr of the base session (null: lr)", minimum=0, exclusive_min=True, nullable=True),
        "num_workers": F(int, 0, "data-loader worker processes", minimum=0, maximum=1024),
        "precision": F(
            str,
            "auto",
            "auto (bf16 where the device runs it natively: CUDA Ampere+, CPUs with AMX/AVX512-BF16; else fp32), "
            "fp32, or bf16/fp16 autocast (fp16 with loss scaling, CUDA only)",
            choices=PRECISION_NAMES,
        ),
        "compile": F(bool, False, "torch.compile the backbone, adapters included (first steps pay the compile)"),
        "threads": F(
            int,
            None,
            "CPU threads (null: OMP_NUM_THREADS, else cores/workers)",
            minimum=1,
            maximum=256,  # beyond any machine's cores: 1,000 threads made steps 50-90x slower
            nullable=True,
        ),
    },
    "method": {
        "name": F(str, "lora", "a method from `avl-peft list`"),
        "policy": F(str, "continue", "adapter lifecycle across experiences", choices=POLICIES),
        "targets": F(list, None, "module-name suffixes or regexes (null: qkv, proj, fc1, fc2)", nullable=True),
        "options": F(dict, {}, "method options: rank, alpha, dropout, svd_niter, share, tt_rank, init"),
        "init_from": F(
            str,
            None,
            "a Hugging Face peft LoRA folder the adapter starts from (lora; null: the method's init)",
            nullable=True,
        ),
    },
    "strategy": {
        "name": F(str, "naive", "a strategy from `avl-peft list`"),
        "options": F(dict, {}, "strategy options, e.g. mem_size for replay"),
    },
    "budget": F(
        int,
        None,
        "equal-budget comparison: per method, the largest rank (LoRETTA: rank and tt_rank) "
        "whose adapter parameters do not exceed this many",
        minimum=1,
        maximum=10**12,
        nullable=True,
    ),
    "upstream": {
        "dataset": F(
            str,
            None,
            "pretrained knowledge to measure: glyphs, an offline scenario or imagefolder:<path> (null: off)",
            nullable=True,
        ),
        "head": F(
            str,
            "checkpoint",
            "checkpoint: the checkpoint's own frozen classifier; knn: cosine k-NN on backbone features",
            choices=("checkpoint", "knn"),
        ),
        "k": F(int, 10, "neighbours of the k-NN classifier", minimum=1),
        "per_class": F(
            int, 20, "images per class in the upstream query (and k-NN reference) set", minimum=1, maximum=100_000
        ),
        "seed": F(int, 0, "seed of the upstream data (glyphs: which fonts are held out; use the pretraining seed)"),
    },
    "subspace": {
        "enabled": F(bool, True, "measure update-subspace geometry and feature drift after each experience"),
        "k": F(int, 8, "size of the top-k singular subspaces", minimum=1, maximum=100_000),
        "probe_size": F(
            int, 32, "test images in the fixed probe batch for feature drift (CKA)", minimum=2, maximum=100_000
        ),
        "exact": F(bool, False, "exact SVD instead of randomized (slower on large layers)"),
    },
    "executor": {
        "name": F(str, "sequential", "where runs execute", choices=("sequential", "local", "ray")),
        "workers": F(int, 2, "processes of the local executor", minimum=1, maximum=1024),
        "ray_address": F(str, None, "Ray cluster address (null: start Ray locally)", nullable=True),
        "num_cpus": F(NUM, 1, "CPUs Ray reserves per run", minimum=0, maximum=1024),
        "num_gpus": F(NUM, 0, "GPUs Ray reserves per run (fractions share a GPU)", minimum=0, maximum=1024),
    },
    # Validation-based selection (study.search): candidates tuned per run on a split of its training data.
    "search": F(dict, {}, "dotted key -> candidate values, chosen per run on the validation split (null: none)"),
    "validation": {  # the split a search chooses on (study/search.py, docs/design.md)
        "fraction": F(NUM, 0.2, "share of each class's training images", minimum=0, maximum=1, exclusive_min=True),
        "seed": F(int, None, "seed of the split (null: the run's seed)", minimum=0, maximum=2**32 - 1, nullable=True),
        "experiences": F(str, "first", "choose on the first experience or all (sees ahead)", choices=("first", "all")),
        "metric": F(str, "acc", "maximised (forgetting: minimised)", choices=("acc", *SEARCH_METRICS)),
    },
    "claims": F(list, [], "claims the report judges: [{better: A, than: B, metric: M}] (report/claims.py)"),
    "grid": F(dict, {}, "cartesian axes: dotted key -> list of values"),
    "variants": F(list, [], "list of override sets (dotted key -> value), crossed with the grid"),
}
STUDY_ONLY = ("grid", "variants", "executor", "claims")  # study-level sections, not part of any run's config
FREE_FORM = {"backbone.kwargs", "scenario.options", "method.options", "strategy.options"}


def _type_name(types: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        dict: "a mapping",
        list: "a list",
    }
    if set(types) == {int, float}:
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_value(key: str, field: Field, value: Any) -> Any:
    if value is None:
        if field.nullable:
            return None
        raise ConfigError(f"{key}: must be {_type_name(field.types)}, got null")
    ok = isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)
    if not ok and float in field.types and isinstance(value, str):
        try:  # YAML reads 1e-3 (without a dot) as a string
            value, ok = float(value), True
        except ValueError:
            pass
    if not ok:
        raise ConfigError(f"{key}: must be {_type_name(field.types)}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):  # also '.nan', 'inf' or '1e999' read as text
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if field.choices is not None and value not in field.choices:
        raise ConfigError(
            f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, field.choices))}."
            f"{suggest(str(value), list(map(str, field.choices)))}"
        )
    if field.minimum is not None and (value < field.minimum or (field.exclusive_min and value == field.minimum)):
        op = ">" if field.exclusive_min else ">="
        raise ConfigError(f"{key}: must be {op} {field.minimum}, got {value!r}")
    if field.maximum is not None and value > field.maximum:
        raise ConfigError(f"{key}: must be <= {field.maximum}, got {value!r}")
    return value


def validate_section(prefix: str, schema: dict, data: Any) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping of keys to values, got {type(data).__name__}")
    out = {}
    for key in data:
        if not isinstance(key, str) or key not in schema:
            where = f"in '{prefix}'" if prefix else "at the top level"
            raise ConfigError(
                f"unknown key '{key}' {where}. Allowed: {', '.join(schema)}.{suggest(str(key), list(schema))}"
            )
    for key, spec in schema.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(spec, dict):
            out[key] = validate_section(full, spec, data.get(key, {}) if data.get(key) is not None else {})
        else:
            out[key] = _check_value(full, spec, data.get(key, copy.deepcopy(spec.default)))
    return out


def field_at(path: str) -> Field | None:
    """The schema field a dotted key names; None for keys inside free-form mappings."""
    parts = path.split(".")
    node: Any = SCHEMA
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if prefix in FREE_FORM:
            return None
        if not isinstance(node, dict) or part not in node:
            choices = _all_keys()
            raise ConfigError(
                f"unknown key '{path}'. Valid keys look like: training.lr, method.options.rank, "
                f"seed.{suggest(path, choices)}"
            )
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(f"'{path}' is a section; override one of its keys, e.g. '{path}.{next(iter(node))}'")
    return node


def _all_keys(node: Any = None, prefix: str = "") -> list[str]:
    node = SCHEMA if node is None else node
    keys = []
    for k, v in node.items():
        full = f"{prefix}.{k}" if prefix else k
        keys.extend(_all_keys(v, full) if isinstance(v, dict) else [full])
    return keys


def set_dotted(cfg: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = cfg
    for part in parts[:-1]:
        if node.get(part) is None:  # a missing or empty (`training:`) section
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{path}': '{part}' is not a mapping")
    node[parts[-1]] = value


def get_dotted(cfg: dict, path: str) -> Any:
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


def check_run(cfg: dict) -> None:
    """Cross-field checks and registry lookups for one resolved run."""
    _check_finite(cfg)
    SCENARIOS.get(cfg["scenario"]["name"])
    check_scenario_options(cfg["scenario"]["name"], cfg["scenario"]["options"])
    strategy_options(cfg["strategy"]["name"], cfg["strategy"]["options"])
    cls = METHODS.get(cfg["method"]["name"])
    if not cls.adds_adapter:
        if cfg["method"]["options"]:
            raise ConfigError(f"method.options: method '{cfg['method']['name']}' takes no options")
    else:
        try:
            parse_options(cls.Options, cfg["method"]["name"], cfg["method"]["options"])
        except ConfigError as e:
            raise ConfigError(f"method.options: {e}") from None
    try:
        check_policy(cfg["method"]["name"], cfg["method"]["policy"], cfg["method"]["options"])
    except ConfigError as e:
        raise ConfigError(f"method.policy: {e}") from None
    if cfg["method"].get("init_from") is not None and not getattr(cls, "imports_lora", False):
        able = ", ".join(m for m in METHODS.names() if getattr(METHODS.get(m), "imports_lora", False))
        raise ConfigError(
            f"method.init_from: method '{cfg['method']['name']}' cannot start from a peft LoRA ({able} can)"
        )
    targets = cfg["method"]["targets"]
    if targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(f"method.targets: must be a non-empty list of strings, got {targets!r}")
    if cfg["backbone"]["pretrained"] and cfg["backbone"]["checkpoint"]:
        raise ConfigError("backbone: set either pretrained: true (download) or checkpoint: PATH (local), not both")
    _check_backbone(cfg["backbone"])
    img_size = data_config(meta_model(cfg["backbone"]))["img_size"]
    scenario = cfg["scenario"]
    check_counts(scenario["name"], scenario["n_experiences"], scenario["options"], img_size)
    if cfg.get("budget") is not None:
        _check_budget(cfg)
    device = cfg["training"]["device"]
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", device):
        raise ConfigError(f"training.device: {device!r} is not a device; use cpu, cuda, cuda:N, mps or auto")
    training = cfg["training"]
    if training["head"] in LEGACY_HEADS:
        new = "task_incremental: true" if training["head"] == "multi" else "head: linear"
        raise ConfigError(
            f"training.head: '{training['head']}' is now spelled training.{new} (training.head chooses the "
            "class-incremental classifier: linear, prototype or ranpac)"
        )
    try:
        head_opts = head_options(training["head"], **training["head_options"])
    except ConfigError as e:
        raise ConfigError(f"training.head_options: {e}") from None
    if head_opts.align is not None and STRATEGIES.get(cfg["strategy"]["name"]).owns_model:
        raise ConfigError(
            f"training.head_options.align re-trains the run model's linear head, which strategy "
            f"'{cfg['strategy']['name']}' does not use (it builds its own model); drop align"
        )
    if training["head"] != "linear" and training["task_incremental"]:
        raise ConfigError(
            f"training.head: {training['head']} removes class-incremental bias; a task-incremental run "
            "(training.task_incremental: true) ranks each task's classes with its own head: use head: linear"
        )
    try:
        check_policy(cfg["method"]["name"], cfg["method"]["policy"], cfg["method"]["options"])
    except ConfigError as e:
        raise ConfigError(f"method: {e}") from None
    check_upstream(cfg, img_size)
    # cuda is checked again when the run resolves its device (bf16 support of the GPU it gets)
    resolved = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    device = torch.device(resolved.split(":")[0])
    with warnings.catch_warnings():  # the emulated-bf16 warning is the run's to give, once, not the config check's
        warnings.simplefilter("ignore", PrecisionWarning)
        check_precision(resolve_precision(cfg["training"]["precision"], device), device)
    spec = STRATEGIES.get(cfg["strategy"]["name"])
    if spec.check is not None:
        spec.check(cfg)
    if spec.uses_memory and cfg["training"]["train_mask"] == "current":
        raise ConfigError(
            f"strategy {spec.name} needs training.train_mask: seen — with 'current' the memory's samples of old "
            "classes get no loss, so the strategy would silently act like naive"
        )
    n = cfg["scenario"]["n_experiences"]
    if cfg["training"]["pretrain"] and n is not None and n < 2:
        raise ConfigError("training.pretrain needs at least 2 experiences (the base session plus one more)")


def accepts(method: Any, option: str) -> bool:
    """Whether a method takes an option; unknown methods say yes so the later check names them."""
    if not isinstance(method, str) or method not in METHODS:
        return True
    cls = METHODS.get(method)
    return cls.adds_adapter and option in option_names(cls.Options)


def _check_finite(node: Any, key: str = "") -> None:
    """Refuse NaN and infinite numbers anywhere in a run, free-form options included, naming the key."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key}: must be a finite number, got {node!r}")


def known_options() -> set[str]:
    """Every option some registered adapter takes (a name none takes is a typo and stays to be reported)."""
    return {
        key
        for name in METHODS.names()
        if METHODS.get(name).adds_adapter
        for key in option_names(METHODS.get(name).Options)
    }
