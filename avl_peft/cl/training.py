"""What every run's training loop needs besides the method: seeding, the device, the optimizer, and two
small plugins — a divergence guard and a per-experience progress bar."""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm

from ..errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_device(name: str) -> str:
    """The one spelling check of a device name: ``cpu``, ``auto``, ``cuda``, ``cuda:N`` or ``mps``."""
    if not isinstance(name, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", name):
        raise ConfigError(f"training.device: {name!r} is not a device; use cpu, cuda, cuda:N, mps or auto")
    return name


def check_base_session(pretrain: bool, n_experiences: int | None) -> None:
    """training.pretrain trains experience 0 as a base session, so a run needs one more experience."""
    if pretrain and n_experiences is not None and n_experiences < 2:
        raise ConfigError("training.pretrain needs at least 2 experiences (the base session plus one more)")


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against what this torch can use."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"training.device: '{name}' requested but CUDA is not available here; use cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"training.device: '{name}' but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("training.device: 'mps' requested but Apple's MPS backend is not available here; use cpu")
    return torch.device(name)


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"training.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: this run stops and is recorded as failed."""


class DivergenceGuard(SupervisedPlugin, supports_distributed=True):
    """Stops the run with :class:`TrainingDiverged` as soon as the loss is NaN or infinite."""

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if not torch.isfinite(strategy.loss).all():
            t = strategy.experience.current_experience
            raise TrainingDiverged(
                f"training diverged: loss is {float(strategy.loss.detach())} at experience {t}, epoch "
                f"{strategy.clock.train_exp_epochs}; lower training.lr or check the data"
            )


class BatchProgress(SupervisedPlugin, supports_distributed=True):
    """A per-experience progress bar (batches, with ETA) driven by Avalanche's iteration callbacks."""

    def __init__(self, label: str):
        super().__init__()
        self.label, self.bar = label, None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        total = len(strategy.dataloader) * strategy.train_epochs
        t = strategy.experience.current_experience
        self.bar = tqdm(total=total, desc=f"{self.label} exp {t}", leave=False)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(strategy.loss.detach()):.3f}", refresh=False)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.bar.close()
