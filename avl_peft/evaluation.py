"""Evaluation: Avalanche's metrics and TensorBoard logging, plus the full accuracy matrices.

Avalanche's ``accuracy_metrics``/``forgetting_metrics``/``bwt_metrics`` run in the loop and go to
TensorBoard. :class:`AccuracyMatrixPlugin` additionally stores a[t][i] (accuracy on experience i after
training experience t) in two forms (SPEC §4):
- class-incremental: argmax over every class seen so far;
- task-aware: argmax within experience i's own classes.
The gap between them separates classifier bias from forgetting inside the backbone.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin


class AccuracyMatrixPlugin(SupervisedPlugin):
    """Fills ``matrices[kind][t][i]`` during ``strategy.eval(test_stream)`` after each experience t."""

    def __init__(self, n_experiences: int):
        super().__init__()
        self.n = n_experiences
        self.matrices = {k: [[0.0] * self.n for _ in range(self.n)] for k in ("class_incremental", "task_aware")}
        self.seen: set[int] = set()
        self.trained = 0  # experiences trained so far; eval after training t fills row t
        self._counts: dict[str, list[int]] = {}

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.seen |= set(int(c) for c in strategy.experience.classes_in_this_experience)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.trained += 1

    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._counts = {"class_incremental": [0, 0], "task_aware": [0, 0]}
        self._own = sorted(int(c) for c in strategy.experience.classes_in_this_experience)

    @torch.no_grad()
    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        out, y = strategy.mb_output.float(), strategy.mb_y
        for kind, classes in (("class_incremental", sorted(self.seen)), ("task_aware", self._own)):
            idx = torch.tensor([c for c in classes if c < out.shape[1]], device=out.device, dtype=torch.long)
            if idx.numel() == 0:
                continue
            pred = idx[out.index_select(1, idx).argmax(dim=1)]
            self._counts[kind][0] += int((pred == y).sum())
            self._counts[kind][1] += int(y.numel())

    def after_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.trained == 0:
            return  # an evaluation before any training is not part of the matrix
        i = strategy.experience.current_experience
        for kind, (correct, total) in self._counts.items():
            self.matrices[kind][self.trained - 1][i] = correct / total if total else 0.0


def make_evaluator(log_dir: str | None, *, loggers: list | None = None) -> EvaluationPlugin:
    """Avalanche's accuracy, forgetting and BWT metrics (experience and stream) to TensorBoard."""
    loggers = list(loggers or [])
    if log_dir is not None:
        loggers.append(TensorboardLogger(tb_log_dir=str(log_dir)))
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        loss_metrics(epoch=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        loggers=loggers,
        strict_checks=False,
    )
