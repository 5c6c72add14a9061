"""The Avalanche side of a method: :class:`PEFTPlugin` manages an adapter's lifecycle across experiences.

It composes with Avalanche strategies (the README's table says which, measured): the strategy decides *how*
to learn, the plugin decides *which* parameters can change. It injects the adapters in ``before_training``,
rebuilds the optimizer after every structural change, and after each experience writes ``exp_<t>.pt`` and
applies its ``policy`` (continue, merge, stack, first) at once, so regularisers that run after it snapshot
what the next experience trains. The lifecycle, the policies and how EWC/MAS/SI/RWalk read them:
docs/design.md, "PEFTPlugin across experiences".
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

from ..adapters import METHODS, begin_experience, collect_inputs, end_experience, interference_penalty, needs_inputs
from ..adapters.base import check_method, parse_method_options
from ..adapters.inject import (
    backbone_root,
    check_injection,
    check_trainable,
    end_full_training,
    freeze_adapters,
    inject,
    injection,
    merge,
    parameter_counts,
    trains_backbone_marker,
)
from ..adapters.peft_init import check_lora, init_from_lora, read_lora
from ..adapters.stack import stack
from ..errors import ConfigError
from .checkpoints import checkpoint_files, restore_checkpoint, save_checkpoint
from .composition import check_composition

POLICIES = ("continue", "merge", "stack", "first")
INPUT_SAMPLES = 1024  # layer-input rows kept per layer and experience for the subspace bookkeeping


def reset_optimizer(strategy: Any) -> None:
    """Put the model's current parameters in the strategy's optimizer, with fresh optimizer state.

    Parameters that left the model (a merged adapter) are dropped from the optimizer too, so it never
    keeps stepping tensors that no longer exist in the model.
    """
    strategy.optimized_param_id = None  # forces Avalanche to re-gather (name, param) from the model
    strategy.make_optimizer(reset_optimizer_state=True, remove_params=True)


def check_policy(method: str, policy: str, options: dict[str, Any]) -> None:
    """A method/options/policy combination that cannot work is refused here, before anything trains."""
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    cls = METHODS.get(method)
    if policy == "first" and not cls.adds_adapter:
        raise ConfigError(
            f"policy: first adapts on the first experience and then freezes the adapter; method '{method}' adds "
            "none (for full fine-tuning of the first experience only use training.pretrain: true with method: head)"
        )
    if policy == "stack" and not cls.adds_adapter:
        raise ConfigError(f"policy: stack keeps one adapter branch per experience; method '{method}' adds none")
    if cls.requires_stack and policy != "stack":
        raise ConfigError(f"method '{method}' keeps one branch per experience: it needs policy: stack, got {policy}")
    interference = options.get("interference", "none")
    if interference != "none" and policy != "stack":
        raise ConfigError(
            f"interference: {interference} keeps the update away from earlier experiences' branches/inputs, "
            f"which only policy: stack keeps; got policy: {policy}"
        )


class PEFTPlugin(SupervisedPlugin, supports_distributed=True):
    """Inject ``method``'s adapters into ``strategy.model`` and manage them across experiences.

    :param method: a name from ``avl_peft.methods()`` (adapters and the ``full``/``head`` baselines).
    :param policy: ``continue``, ``merge``, ``stack`` or ``first`` (see module docstring).
    :param pretrain: train the first experience with full fine-tuning (base session).
    :param targets: module-name suffixes or regexes (default: every linear layer in the blocks).
    :param trainable: modules inside the backbone that must keep training (suffixes or regexes), e.g. a
        prompt pool; modules outside the timm backbone (a wrapper's classifier) keep training anyway.
    :param checkpoint_dir: if set, ``exp_<t>.pt`` with the adapter and head state after each experience.
    :param model: if given, targets/rank/``trainable`` are checked against it now (else at the first
        ``before_training``).
    :param init_from: a Hugging Face peft LoRA folder the first adapter starts from (methods with the
        ``imports_lora`` capability: lora), checked against the backbone's targets, shapes and rank.
    :param options: the method's options (``rank``, ``alpha``, ``interference``, ``lambda``, …), validated
        here.
    """

    def __init__(
        self,
        method: str,
        *,
        policy: str = "continue",
        pretrain: bool = False,
        targets: list[str] | None = None,
        trainable: list[str] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        model: torch.nn.Module | None = None,
        init_from: str | os.PathLike | None = None,
        **options: Any,
    ):
        super().__init__()
        check_method(method, options, targets, init_from)  # fail now, not at the first experience
        self.init_from, self._init_lora, self._initialised = init_from, None, False
        if init_from is not None:
            self._init_lora = read_lora(init_from)  # read (bounded) and parsed now: a bad folder fails early
        check_policy(method, policy, options)
        self.method, self.policy, self.pretrain = method, policy, bool(pretrain)
        self.targets, self.options = targets, options
        self.trainable = check_trainable(trainable)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.experiences_done = 0  # counts this plugin's experiences, independent of eval calls
        self.trained_counts: dict[str, int] | None = None  # parameter counts as the last experience trained
        self._token = secrets.token_hex(8)  # marks the model this plugin manages (and copies of it)
        self._used = False
        self._restructured = False  # structure changed since the optimizer was last rebuilt
        if model is not None:
            self.check(model)

    # -- validation and bookkeeping ------------------------------------------------------------------

    def check(self, model: torch.nn.Module) -> None:
        """Raise ConfigError now if the method cannot be injected into ``model`` as configured (targets that
        match no linear layer, a rank above a layer's limit, ``trainable`` naming nothing). Changes nothing."""
        chosen = check_injection(model, self.method, targets=self.targets, trainable=self.trainable, **self.options)
        if self._init_lora is not None:
            root, _ = backbone_root(model)
            modules = dict(model.named_modules())
            shapes = {n.removeprefix(f"{root}."): tuple(modules[n].weight.shape) for n in chosen}
            rank = parse_method_options(METHODS.get(self.method).Options, self.method, self.options).rank
            check_lora(self._init_lora, shapes, rank, str(self.init_from))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the lifecycle exactly (plain data)."""
        return {
            "experiences_done": self.experiences_done,
            "restructured": self._restructured,
            "token": self._token,
            "initialised": self._initialised,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experiences_done = int(state["experiences_done"])
        self._restructured = bool(state["restructured"])
        self._token = str(state["token"])  # copies of the model saved with the strategy's state carry it
        self._initialised = bool(state.get("initialised", self.experiences_done > 0))

    def _adopt(self, model: torch.nn.Module) -> None:
        """Take ``model`` as the one this plugin manages; refuse a different model once one was managed."""
        if self._used and getattr(model, "avl_peft_owner", None) != self._token:
            raise ConfigError(
                f"this PEFTPlugin already managed another model ({self.experiences_done} experience(s)); create a new "
                "PEFTPlugin for each model (or plugin.restore(model) a model from its checkpoints)"
            )
        model.avl_peft_owner = self._token  # copies the strategy makes (GDumb) carry it too
        self._used = True

    def restore(
        self,
        model: torch.nn.Module,
        *,
        through: int | None = None,
        visit: Callable[[int, torch.nn.Module], None] | None = None,
    ) -> int:
        """Continue in Python: load every ``exp_<t>.pt`` of ``checkpoint_dir`` into ``model`` in order.

        ``model`` is built as the trained one was (same backbone, seed or checkpoint). Each checkpoint is
        restored and followed by the same end-of-experience step training made (merge and re-inject, end of
        the base session, a new branch), so the model is left ready for the next experience and the
        plugin counts on from there (no ``exp_<t>.pt`` is ever overwritten). Under ``policy: stack`` without
        a base session or ``visit`` only the newest (or ``exp_<through>.pt``) is loaded: each checkpoint holds
        every earlier branch, folded. Returns that next index.

        ``through=t`` stops after ``exp_<t>.pt``, *before* its end-of-experience step: the model is left as
        experience t finished training (what an export of experience t reads). ``visit(t, model)`` is called
        after each checkpoint is restored, before that step (e.g. to read the branches a merge will fold).
        """
        if self.checkpoint_dir is None:
            raise ConfigError("restore needs the plugin's checkpoint_dir")
        files = checkpoint_files(self.checkpoint_dir)
        if not files:
            raise ConfigError(f"no exp_<t>.pt checkpoints in '{self.checkpoint_dir}' to restore")
        if list(files) != list(range(len(files))):
            raise ConfigError(
                f"checkpoints in '{self.checkpoint_dir}' are not exp_0 … exp_N without gaps: {list(files)}"
            )
        if through is not None and through not in files:
            raise ConfigError(f"no exp_{through}.pt in '{self.checkpoint_dir}' (it holds exp_0 … exp_{len(files) - 1})")
        self._used = False
        self._initialised = True  # the checkpoints hold the trained adapters: init_from applies to none of them
        self._adopt(model)
        order = list(files.items())
        if self.policy == "stack" and not self.pretrain and visit is None:
            # Each checkpoint holds every earlier branch (folded): only the one asked for needs loading.
            last = len(files) - 1 if through is None else through
            order = [(last, files[last])]
        for t, path in order:
            restore_checkpoint(model, path)
            self.experiences_done = t
            if visit is not None:
                visit(t, model)
            if t == through:
                self.experiences_done = t + 1
                return t + 1  # left as experience t finished: no merge, new branch or re-injection
            self._next_structure(model)
        self.experiences_done = len(files)
        self._restructured = True
        return self.experiences_done

    # -- structure ------------------------------------------------------------------------------------

    def _inject(self, model: torch.nn.Module) -> None:
        inject(model, self.method, targets=self.targets, trainable=self.trainable, **self.options)
        if self._init_lora is not None and not self._initialised:
            init_from_lora(model, self.init_from, self._init_lora)  # the first adapter only, not later ones
            self._initialised = True

    def _in_base_session(self) -> bool:
        return self.pretrain and self.experiences_done == 0

    def _prepare(self, model: torch.nn.Module) -> None:
        """Give ``model`` the structure experience ``experiences_done`` trains, if it lacks it (idempotent)."""
        config = injection(model)
        if self._in_base_session():
            if config is None:
                inject(model, "full")  # base session: the whole backbone learns the first experience
                self._restructured = True
            return
        if config is not None and config["method"] != self.method and trains_backbone_marker(model):
            end_full_training(model)  # e.g. a strategy's copy of the model from the base session
            config = None
        if config is None:
            self._inject(model)
            self._restructured = True
        elif config["method"] != self.method:
            raise ConfigError(
                f"the model already has '{config['method']}' injected, not '{self.method}'; start from a fresh model"
            )

    def _next_structure(self, model: torch.nn.Module) -> None:
        """After experience ``experiences_done`` trained: the structure the next one trains."""
        if self._in_base_session():
            end_full_training(model)  # the base session's weights are now the frozen backbone
            self._inject(model)
        elif self.policy == "first":
            if self.experiences_done == (1 if self.pretrain else 0):
                freeze_adapters(model)  # the adapted backbone is final; only the classifier trains from here
            else:
                return
        elif self.policy == "merge":
            merge(model)
            self._inject(model)
        elif self.policy == "stack":
            stack(model)  # freeze this experience's branch, start a fresh one
        else:
            return  # policy "continue": the same adapter keeps training, optimizer state included
        self._restructured = True

    def _inputs(self, strategy: Any) -> dict[str, torch.Tensor] | None:
        """The adapted layers' inputs on this experience's training data (only where the method needs them)."""
        if not needs_inputs(strategy.model):
            return None
        dataset = strategy.experience.dataset
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset  # no augmentation
        # Own generator: a DataLoader iterator otherwise draws its base seed from torch's global RNG,
        # which would shift the training's random stream.
        loader = DataLoader(
            dataset, batch_size=strategy.eval_mb_size, shuffle=False, generator=torch.Generator().manual_seed(0)
        )
        return collect_inputs(strategy.model, loader, max_samples=INPUT_SAMPLES)

    # -- Avalanche callbacks ----------------------------------------------------------------------------

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        if not self._used:
            check_composition(strategy, self)
            clock = getattr(strategy, "clock", None)
            if self.experiences_done == 0 and clock is not None and clock.train_exp_counter > 0:
                self.experiences_done = int(clock.train_exp_counter)  # joined (or resumed) mid-stream
            self._check_no_overwrite()
        self._adopt(model)
        self._prepare(model)
        model.to(strategy.device)

    def _check_no_overwrite(self) -> None:
        if self.checkpoint_dir is None:
            return
        clash = [t for t in checkpoint_files(self.checkpoint_dir) if t >= self.experiences_done]
        if clash:
            raise ConfigError(
                f"'{self.checkpoint_dir}' already holds exp_{clash[0]}.pt from an earlier run and PEFTPlugin never "
                "overwrites a checkpoint: call plugin.restore(model) to continue that run, or use an empty "
                "checkpoint_dir"
            )

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        self._adopt(model)  # the strategy may have swapped in a copy (GDumb)
        self._prepare(model)
        if not self._restructured:
            return
        if not self._in_base_session():
            begin_experience(model, self._inputs(strategy))
        model.to(strategy.device)
        reset_optimizer(strategy)
        self._restructured = False

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.options.get("interference") == "orthogonal":
            strategy.loss = strategy.loss + interference_penalty(strategy.model)
        model_loss = getattr(METHODS.get(self.method), "model_loss", None)
        if model_loss is not None and not self._in_base_session():
            extra = model_loss(strategy.model, strategy.mb_x)  # e.g. CL-LoRA's distillation
            if extra is not None:
                strategy.loss = strategy.loss + extra

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        if not self._in_base_session() and needs_inputs(model):
            end_experience(model, self._inputs(strategy))  # grow the kept input subspace with this experience
        if not self._in_base_session():
            self.trained_counts = parameter_counts(model)
        if self.checkpoint_dir is not None:
            t = self.experiences_done
            path = self.checkpoint_dir / f"exp_{t}.pt"
            if path.exists():
                raise ConfigError(f"'{path}' exists; PEFTPlugin never overwrites a checkpoint")
            save_checkpoint(model, path, t, method=self.method, policy=self.policy)
        self._next_structure(model)
        if self._restructured:
            model.to(strategy.device)
            # Parameters were replaced (a branch folded away, a fresh one added): Avalanche's name -> parameter map
            # must follow now, or its next make_optimizer finds one tensor under two names.
            reset_optimizer(strategy)
        self.experiences_done += 1
