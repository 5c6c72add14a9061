"""Evaluation: Avalanche's metrics and TensorBoard logging, plus the full accuracy matrices.

Avalanche's accuracy/forgetting/BWT metrics run in the loop and go to TensorBoard;
:class:`AccuracyMatrixPlugin` additionally stores a[t][i] whole, class-incremental and task-aware (the gap
separates classifier bias from forgetting inside the backbone). Formulas, and why they agree with
Avalanche's (tested): docs/design.md, "Metrics".
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin

from .distributed import all_reduce_sum


class AccuracyMatrixPlugin(SupervisedPlugin, supports_distributed=True):
    """Fills ``matrices[kind][t][i]`` during ``strategy.eval(test_stream)`` after each experience t.

    Only experiences of the stream named ``stream`` (default ``test``) are recorded, so an extra
    ``strategy.eval(train_stream)`` cannot overwrite the test accuracies. ``output`` names the strategy
    attribute holding the scores (``mb_output``; ``linear_output`` is the trained linear head's scores when
    a statistics head replaced ``mb_output``).
    """

    def __init__(self, n_experiences: int, stream: str = "test", output: str = "mb_output"):
        super().__init__()
        self.n, self.stream, self.output = n_experiences, stream, output
        self.matrices = {k: [[0.0] * self.n for _ in range(self.n)] for k in ("class_incremental", "task_aware")}
        self.seen: set[int] = set()
        self.trained = 0  # experiences trained so far; eval after training t fills row t
        self._counts: dict[str, list[int]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"matrices": self.matrices, "seen": sorted(self.seen), "trained": self.trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matrices, self.seen, self.trained = state["matrices"], set(state["seen"]), state["trained"]

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.seen |= set(int(c) for c in strategy.experience.classes_in_this_experience)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.trained += 1

    def _recording(self, strategy: Any) -> bool:
        stream = getattr(strategy.experience, "origin_stream", None)
        return getattr(stream, "name", self.stream) == self.stream

    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._counts = {"class_incremental": [0, 0], "task_aware": [0, 0]}
        self._own = sorted(int(c) for c in strategy.experience.classes_in_this_experience)

    @torch.no_grad()
    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if not self._recording(strategy):
            return
        out, y = getattr(strategy, self.output, strategy.mb_output).float(), strategy.mb_y
        for kind, classes in (("class_incremental", sorted(self.seen)), ("task_aware", self._own)):
            idx = torch.tensor([c for c in classes if c < out.shape[1]], device=out.device, dtype=torch.long)
            if idx.numel() == 0:
                continue
            pred = idx[out.index_select(1, idx).argmax(dim=1)]
            self._counts[kind][0] += int((pred == y).sum())
            self._counts[kind][1] += int(y.numel())

    def after_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.trained == 0 or not self._recording(strategy):
            return  # an evaluation before any training (or of another stream) is not part of the matrix
        i = strategy.experience.current_experience
        kinds = list(self._counts)
        # Under torchrun each process evaluated a shard: sum the counts over processes.
        summed = all_reduce_sum([float(v) for kind in kinds for v in self._counts[kind]])
        for j, kind in enumerate(kinds):
            correct, total = summed[2 * j], summed[2 * j + 1]
            self.matrices[kind][self.trained - 1][i] = correct / total if total else 0.0


class FlushingTensorboardLogger(TensorboardLogger):
    """Avalanche's TensorBoard logger, flushed after every training experience and evaluation.

    The plain logger leaves events in the writer's buffer (flushed every 120 s, or when the logger is
    garbage-collected), so a report read right after ``run_experiment`` returned could miss them.
    """

    def after_training_exp(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        self.writer.flush()

    def after_eval(self, strategy: Any, metric_values: Any, **kwargs: Any) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_evaluator(log_dir: str | None, *, loggers: list | None = None) -> EvaluationPlugin:
    """Avalanche's accuracy, loss, forgetting and BWT metrics (experience and stream) to TensorBoard."""
    loggers = list(loggers or [])
    if log_dir is not None:
        loggers.append(FlushingTensorboardLogger(tb_log_dir=str(log_dir)))
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        loss_metrics(epoch=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        loggers=loggers,
        strict_checks=False,
    )
