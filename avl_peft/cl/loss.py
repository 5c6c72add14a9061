"""The training loss of every run: Avalanche's MaskedCrossEntropy under the harness's ``train_mask`` name."""

from __future__ import annotations

from typing import Any

from avalanche.training import MaskedCrossEntropy

from ..errors import ConfigError

TRAIN_MASKS = {"current": "new", "seen": "seen"}


class TrainMaskLoss(MaskedCrossEntropy):
    """Avalanche's MaskedCrossEntropy (``train_mask``: ``current`` → only this experience's logits enter the
    loss, as L2P/PILOT do; ``seen`` → every class seen so far), updated at each experience without going
    through Avalanche's deprecated hook (which re-enables its deprecation warning on every call)."""

    supports_distributed = True  # a loss: no cross-process state

    def __init__(self, train_mask: str = "current"):
        if train_mask not in TRAIN_MASKS:
            raise ConfigError(f"train_mask must be one of {', '.join(TRAIN_MASKS)}, got {train_mask!r}")
        super().__init__(mask=TRAIN_MASKS[train_mask])

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._adaptation(strategy.experience.classes_in_this_experience)

    def state_dict(self) -> dict[str, Any]:
        """The classes seen so far (what the mask lets in); a resumed run needs them back."""
        return {
            "current": sorted(int(c) for c in self.current_classes),
            "old": sorted(int(c) for c in self.old_classes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current_classes, self.old_classes = set(state["current"]), set(state["old"])
