"""Hooks into the training loop: what a run does besides stepping the optimizer.

A :class:`~train.trainer.Trainer` calls every callback it was given at fixed points; a
callback may return statistics to log with the step, ask the run to stop, and keep
state across ``--resume``. Calibration-aware margins (:mod:`train.margins`) and early
stopping are callbacks, so the loop itself stays the same for every recipe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from imagesets import ImageSet


class Run(Protocol):
    """What a callback may use of the run calling it (:class:`~train.trainer.Trainer`)."""

    def embed(self, images: ImageSet) -> np.ndarray:
        """Embeddings of ``images`` with the model as it is now (eval mode)."""

    def say(self, text: str) -> None:
        """Print a line of progress (quiet runs print nothing)."""


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    def on_fit_start(self, trainer: Run) -> None:
        """Before the first step of this process (also after a resume)."""

    def on_step_end(self, trainer: Run, step: int) -> dict[str, float]:
        """After optimizer step ``step`` (1-based, global); returns statistics to log."""
        return {}

    def on_evaluate(self, trainer: Run, epoch: int, metrics: dict[str, Any]) -> None:
        """After the held-out evaluation of ``epoch`` (validation classes when held out)."""

    def should_stop(self) -> bool:
        """True ends training after the current epoch (the run still finishes and exports)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on ``--resume``)."""


class StopWhenFlat(Callback):
    """Stop when held-out Recall@1 has not risen by ``min_delta`` for ``patience`` evaluations.

    "Trained to convergence" then means what it says: the held-out retrieval metric
    stopped improving, measured on classes the model never saw, never on the test split
    when validation classes are held out.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "recall_at_1") -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1 evaluation, got {patience}")
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.best: float | None = None
        self.flat = 0

    def on_evaluate(self, trainer: Run, epoch: int, metrics: dict[str, Any]) -> None:
        value = float(metrics[self.metric])
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.flat = value, 0
        else:
            self.flat += 1

    def should_stop(self) -> bool:
        return self.flat >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "flat": self.flat}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.flat = state["best"], state["flat"]
