"""The run configuration: one dataclass per YAML section, every key a :func:`~avl_peft.options.knob` with its
default, reason and bounds, parsed by :func:`avl_peft.options.parse_options` (the project's one config engine).

Types, bounds and choices are checked at parse time; each section's own rules by its ``check()``; the rules
that join sections by :meth:`RunConfig.check`, once per expanded run (:mod:`.grid`). Checks that belong to
a method, strategy, scenario or device live with their owner and are called from here. Adding a key is one
``knob`` line in its section.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import torch

from ...adapters import METHODS
from ...adapters.base import check_method, check_targets
from ...backbones import check_weights_source, data_config
from ...cl.heads import HEADS, head_options
from ...cl.loss import TRAIN_MASKS
from ...cl.plugin import POLICIES, check_policy
from ...cl.precision import PRECISIONS, check_precision
from ...cl.scenarios import check_counts, parse_scenario_options
from ...cl.strategies import STRATEGIES, strategy_options
from ...cl.training import OPTIMIZERS, check_base_session, check_device
from ...errors import ConfigError
from ...hardware import PrecisionWarning, resolve_precision
from ...options import all_keys, knob, option_names, parse_options
from ...options import field_at as _field_at
from ...registry import suggest
from ...validate import check_finite_tree
from ..upstream import HEADS as UPSTREAM_HEADS
from ..upstream import check_upstream
from .backbone_checks import _check_backbone, _check_budget, meta_model
from .executor import ExecutorOptions

# Values training.head took before it chose the classifier; refused with the new spelling (Training.check).
LEGACY_HEADS = ("incremental", "multi")

# Defaults are the quickstart-scale choices; each has its reason. Upper bounds are there to catch typos (an
# extra ten zeros), not to limit real studies: each is far above any sensible value (10,000 epochs or
# experiences, a million images per batch, 1,024 workers, 10^12 adapter parameters); the seed's is numpy's.
# Every number must also be finite: YAML's .nan/.inf pass every < and > comparison (avl_peft.validate).
EPOCHS, IMAGES = 10_000, 1_000_000


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str = knob("vit_tiny_patch16_224", "timm model, with its full tag for pretrained weights")
    pretrained: bool = knob(False, "download timm's pretrained weights (needs network)")
    checkpoint: str | None = knob(None, "local .pth/.safetensors state dict or `avl-peft pretrain` folder")
    pretrain: str | None = knob(None, "pretrain YAML (configs/pretrain_glyphs.yaml): built once, then cached")
    kwargs: dict = knob({}, "extra timm.create_model arguments, e.g. img_size, patch_size, depth")

    def check(self) -> None:
        check_weights_source(pretrained=self.pretrained, checkpoint=self.checkpoint, pretrain=self.pretrain)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str = knob("digits", "a scenario from `avl-peft list`")
    n_experiences: int | None = knob(None, "experiences (null: the scenario's default)", minimum=1, maximum=EPOCHS)
    root: str | None = knob(None, "dataset folder (null: the scenario's default)")
    options: dict = knob({}, "scenario-specific options")

    @functools.cached_property
    def parsed_options(self) -> Any:
        """The scenario's ``Options``, parsed by the scenarios module (as ``build_scenario`` does)."""
        return parse_scenario_options(self.name, self.options)

    def check(self) -> None:
        self.parsed_options  # noqa: B018 -- parsing is the check


@dataclasses.dataclass(frozen=True)
class Training:
    optimizer: str = knob("adamw", "optimizer", choices=OPTIMIZERS)
    lr: int | float = knob(
        1e-3, "learning rate (methods differ: sweep it for fair comparisons)", minimum=0, exclusive_min=True
    )
    weight_decay: int | float = knob(0.0, "weight decay", minimum=0)
    momentum: int | float = knob(0.9, "SGD momentum", minimum=0, maximum=1)
    epochs: int = knob(1, "epochs per experience", minimum=1, maximum=EPOCHS)
    batch_size: int = knob(32, "training mini-batch size", minimum=1, maximum=IMAGES)
    eval_batch_size: int = knob(128, "evaluation mini-batch size", minimum=1, maximum=IMAGES)
    device: str = knob("cpu", "cpu, cuda, cuda:N, mps or auto; must be available where the run trains")
    train_mask: str = knob("current", "logits entering the training loss", choices=tuple(TRAIN_MASKS))
    head: str = knob(
        "linear",
        "class-incremental classifier: the trained linear head, or a statistics head on the backbone's features",
        choices=(*HEADS.names(), *LEGACY_HEADS),
    )
    head_options: dict = knob({}, "options of the head (ranpac: dim, lambdas, val_fraction; all: align, drift, ...)")
    task_incremental: bool = knob(False, "one head per task (Avalanche MultiHeadClassifier) with task labels")
    pretrain: bool = knob(False, "base session: train experience 0 with full fine-tuning")
    pretrain_epochs: int | None = knob(None, "epochs of the base session (null: epochs)", minimum=1, maximum=EPOCHS)
    pretrain_lr: int | float | None = knob(None, "lr of the base session (null: lr)", minimum=0, exclusive_min=True)
    num_workers: int = knob(0, "data-loader worker processes", minimum=0, maximum=1024)
    precision: str = knob(
        "auto",
        "auto (bf16 where the device runs it natively, else fp32), fp32, bf16 or fp16",
        choices=("auto", *PRECISIONS),
    )
    compile: bool = knob(False, "torch.compile the backbone, adapters included (first steps pay the compile)")
    # beyond any machine's cores: 1,000 threads made steps 50-90x slower
    threads: int | None = knob(None, "CPU threads (null: OMP_NUM_THREADS, else cores/workers)", minimum=1, maximum=256)

    def check(self) -> None:
        check_device(self.device)
        if self.head in LEGACY_HEADS:
            new = "task_incremental: true" if self.head == "multi" else "head: linear"
            raise ConfigError(
                f"training.head: '{self.head}' is now spelled training.{new} (training.head chooses the "
                "class-incremental classifier: linear, prototype or ranpac)"
            )
        if self.head != "linear" and self.task_incremental:
            raise ConfigError(
                f"training.head: {self.head} removes class-incremental bias; a task-incremental run "
                "(training.task_incremental: true) ranks each task's classes with its own head: use head: linear"
            )


@dataclasses.dataclass(frozen=True)
class Method:
    name: str = knob("lora", "a method from `avl-peft list`")
    policy: str = knob("continue", "adapter lifecycle across experiences", choices=POLICIES)
    targets: list | None = knob(None, "module-name suffixes or regexes (null: qkv, proj, fc1, fc2)")
    options: dict = knob({}, "method options: rank, alpha, dropout, svd_niter, share, tt_rank, init")
    init_from: str | None = knob(None, "a Hugging Face peft LoRA folder the adapter starts from (lora)")

    def check(self) -> None:
        METHODS.get(self.name)
        try:
            check_targets(self.targets)
        except ConfigError as e:
            raise ConfigError(f"method.{e}") from None
        try:
            check_method(self.name, self.options, self.targets, self.init_from)
        except ConfigError as e:
            raise (e if str(e).startswith("method.") else ConfigError(f"method.options: {e}")) from None
        try:
            check_policy(self.name, self.policy, self.options)
        except ConfigError as e:
            raise ConfigError(f"method.policy: {e}") from None


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str = knob("naive", "a strategy from `avl-peft list`")
    options: dict = knob({}, "strategy options, e.g. mem_size for replay")

    def check(self) -> None:
        strategy_options(self.name, self.options)


@dataclasses.dataclass(frozen=True)
class Upstream:
    dataset: str | None = knob(None, "pretrained knowledge to measure: glyphs, a scenario or imagefolder:<path>")
    head: str = knob("checkpoint", "checkpoint: its own frozen classifier; knn: cosine k-NN", choices=UPSTREAM_HEADS)
    k: int = knob(10, "neighbours of the k-NN classifier", minimum=1)
    per_class: int = knob(
        20, "images per class in the upstream query (and k-NN reference) set", minimum=1, maximum=100_000
    )
    seed: int = knob(0, "seed of the upstream data (glyphs: which fonts are held out; use the pretraining seed)")


@dataclasses.dataclass(frozen=True)
class Subspace:
    enabled: bool = knob(True, "measure update-subspace geometry and feature drift after each experience")
    k: int = knob(8, "size of the top-k singular subspaces", minimum=1, maximum=100_000)
    probe_size: int = knob(
        32, "test images in the fixed probe batch for feature drift (CKA)", minimum=2, maximum=100_000
    )
    exact: bool = knob(False, "exact SVD instead of randomized (slower on large layers)")


# Metrics a validation search may choose on besides acc (study/search.py; forgetting ones are minimised).
SEARCH_METRICS = ("avg_incremental_acc", "til_acc", "bwt", "forgetting", "til_forgetting")


@dataclasses.dataclass(frozen=True)
class Validation:
    """The split a ``search`` chooses on (study/search.py; docs/design.md, "Validation-based selection")."""

    fraction: int | float = knob(0.2, "share of each class's training images", minimum=0, maximum=1, exclusive_min=True)
    seed: int | None = knob(None, "seed of the split (null: the run's seed)", minimum=0, maximum=2**32 - 1)
    experiences: str = knob("first", "choose on the first experience or all (sees ahead)", choices=("first", "all"))
    metric: str = knob("acc", "maximised (forgetting: minimised)", choices=("acc", *SEARCH_METRICS))
    per: str = knob("run", "a selection per run, or per variant (at validation.seed)", choices=("run", "variant"))


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run, as :func:`.grid.expand` resolves it; ``check()`` holds every rule that joins sections."""

    name: str = knob("study", "study name, used in the report title")
    seed: int = knob(0, "seeds the class order, initialisation and data order", minimum=0, maximum=2**32 - 1)
    backbone: Backbone = _section(Backbone)
    scenario: Scenario = _section(Scenario)
    training: Training = _section(Training)
    method: Method = _section(Method)
    strategy: Strategy = _section(Strategy)
    budget: int | None = knob(
        None,
        "equal-budget comparison: per method, the largest rank within this many parameters",
        minimum=1,
        maximum=10**12,
    )
    upstream: Upstream = _section(Upstream)
    subspace: Subspace = _section(Subspace)
    search: dict = knob({}, "dotted key -> candidate values, chosen per run on the validation split (study/search.py)")
    validation: Validation = _section(Validation)

    @functools.cached_property
    def mapping(self) -> dict[str, Any]:
        """The run as the plain mapping runs, results.json and study.yaml carry."""
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Every section's own rules, then the cross-section ones, each once."""
        cfg = self.mapping
        check_finite_tree(cfg)
        for section in (self.scenario, self.strategy, self.method, self.backbone):
            section.check()
        _check_backbone(cfg["backbone"])
        img_size = data_config(meta_model(cfg["backbone"]))["img_size"]
        check_counts(self.scenario.name, self.scenario.n_experiences, self.scenario.parsed_options, img_size)
        if self.budget is not None:
            _check_budget(cfg)
        self.training.check()
        try:
            head_opts = head_options(self.training.head, **self.training.head_options)
        except ConfigError as e:
            raise ConfigError(f"training.head_options: {e}") from None
        spec = STRATEGIES.get(self.strategy.name)
        if head_opts.align is not None and spec.owns_model:
            raise ConfigError(
                f"training.head_options.align re-trains the run model's linear head, which strategy "
                f"'{spec.name}' does not use (it builds its own model); drop align"
            )
        check_upstream(cfg, img_size)
        _check_precision(self.training)
        if spec.check is not None:
            spec.check(cfg)
        if spec.uses_memory and self.training.train_mask == "current":
            raise ConfigError(
                f"strategy {spec.name} needs training.train_mask: seen — with 'current' the memory's samples of old "
                "classes get no loss, so the strategy would silently act like naive"
            )
        check_base_session(self.training.pretrain, self.scenario.n_experiences)


@dataclasses.dataclass(frozen=True)
class StudyConfig(RunConfig):
    """A study: one base run plus the settings that are the study's, not any run's."""

    executor: ExecutorOptions = _section(ExecutorOptions)
    grid: dict = knob({}, "cartesian axes: dotted key -> list of values")
    variants: list = knob([], "list of override sets (dotted key -> value), crossed with the grid")
    claims: list = knob([], "claims the report judges: [{better: A, than: B, metric: M}] (report/claims.py)")


STUDY_ONLY = tuple(f.name for f in dataclasses.fields(StudyConfig) if f.name not in RunConfig.__dataclass_fields__)


def as_config(config: Any) -> dict[str, Any]:
    """A parsed config as the plain mapping runs, results.json and study.yaml carry."""
    return dataclasses.asdict(config)


def parse_run(cfg: Any) -> RunConfig:
    return parse_options(RunConfig, "", cfg, noun="key")


def parse_study(data: Any) -> StudyConfig:
    return parse_options(StudyConfig, "", data, noun="key")


def _check_precision(training: Training) -> None:
    # cuda is checked again when the run resolves its device (bf16 support of the GPU it gets)
    device = training.device
    resolved = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    device = torch.device(resolved.split(":")[0])
    with warnings.catch_warnings():  # the emulated-bf16 warning is the run's to give, once, not the config check's
        warnings.simplefilter("ignore", PrecisionWarning)
        check_precision(resolve_precision(training.precision, device), device)


def check_run(cfg: dict) -> None:
    """Cross-field checks and registry lookups for one resolved run (a mapping)."""
    parse_run(cfg).check()


def field_at(path: str) -> dataclasses.Field | None:
    """The knob a dotted key names; None for keys inside free-form mappings (their owner checks them)."""
    try:
        return _field_at(StudyConfig, path)
    except KeyError:
        raise ConfigError(
            f"unknown key '{path}'. Valid keys look like: training.lr, method.options.rank, "
            f"seed.{suggest(path, all_keys(StudyConfig))}"
        ) from None


def default(path: str) -> Any:
    """The default of the knob at a dotted key, e.g. ``default('method.name') == 'lora'``."""
    return field_at(path).default


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


def accepts(method: Any, option: str) -> bool:
    """Whether a method takes an option; unknown methods say yes so the later check names them."""
    if not isinstance(method, str) or method not in METHODS:
        return True
    cls = METHODS.get(method)
    return cls.adds_adapter and option in option_names(cls.Options)


def known_options() -> set[str]:
    """Every option some registered adapter takes (a name none takes is a typo and stays to be reported)."""
    return {
        key
        for name in METHODS.names()
        if METHODS.get(name).adds_adapter
        for key in option_names(METHODS.get(name).Options)
    }
