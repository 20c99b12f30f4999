"""Hooks into the training loop: what a run does besides stepping the optimizer.

A :class:`~train.trainer.Trainer` calls every callback it was given at fixed points; a
callback may return statistics to log with the step, ask the run to stop, keep state
across ``--resume``, and change the model before it is tested and exported.
Calibration-aware margins (:mod:`train.margins`) and early stopping with the best
checkpoint restored are callbacks, so the loop itself stays the same for every recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    import numpy as np

    from imagesets import ImageSet


class Run(Protocol):
    """What a callback may use of the run calling it (:class:`~train.trainer.Trainer`)."""

    step: int  # optimizer steps so far (global)
    run_dir: Path
    model: torch.nn.Module
    losses: torch.nn.ModuleDict
    device: torch.device

    def embed(self, images: ImageSet) -> np.ndarray:
        """Embeddings of ``images`` with the model as it is now (eval mode)."""

    def say(self, text: str) -> None:
        """Print a line of progress (quiet runs print nothing)."""

    def final_margins(self) -> dict[str, float] | None:
        """The TCM margins in force (calibrated ones move during training)."""


BEST_CHECKPOINT = "best.pt"


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

    def on_fit_end(self, trainer: Run) -> dict[str, Any]:
        """After the last epoch, before the test evaluation and the export (rank 0 only).

        May change the model (e.g. put back the best checkpoint); what it returns goes
        into ``metrics.json``.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on ``--resume``)."""


class StopWhenFlat(Callback):
    """Stop when held-out Recall@1 has not risen by ``min_delta`` for ``patience`` evaluations.

    "Trained to convergence" then means what it says: the held-out retrieval metric
    stopped improving, measured on classes the model never saw, never on the test split
    when validation classes are held out. ``patience=None`` never stops (the best
    evaluation is still tracked).

    Two values are tracked: ``level``, the last value that beat the one before it by
    ``min_delta`` (patience counts evaluations since), and ``best``, the highest value
    measured (its step is the best checkpoint). With ``min_delta`` > 0 they differ: a
    run creeping up by less than ``min_delta`` stops, and keeps its highest point.

    With ``restore_best`` the weights of the best evaluation are written to
    ``RUN_DIR/best.pt`` when they are measured and put back at the end, so the test
    metrics and the exported model are those of the best held-out step, not of the
    last one (which, after ``patience`` flat evaluations, is by construction no better).
    The file outlives the process, so ``--resume`` keeps it too.
    """

    def __init__(
        self,
        patience: int | None,
        min_delta: float = 0.0,
        metric: str = "recall_at_1",
        restore_best: bool = False,
    ) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 evaluation, got {patience}")
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.restore_best = restore_best
        self.level: float | None = None
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.flat = 0

    def on_evaluate(self, trainer: Run, epoch: int, metrics: dict[str, Any]) -> None:
        value = float(metrics[self.metric])
        if self.level is None or value > self.level + self.min_delta:
            self.level, self.flat = value, 0
        else:
            self.flat += 1
        if self.best is None or value > self.best:
            self.best, self.best_step, self.best_epoch = value, trainer.step, epoch
            if self.restore_best:
                save_weights(trainer, trainer.run_dir / BEST_CHECKPOINT)

    def should_stop(self) -> bool:
        return self.patience is not None and self.flat >= self.patience

    def on_fit_end(self, trainer: Run) -> dict[str, Any]:
        if self.best is None:
            return {}
        out: dict[str, Any] = {
            "best": {"step": self.best_step, "epoch": self.best_epoch, self.metric: self.best},
            "restored_best": False,
        }
        path = trainer.run_dir / BEST_CHECKPOINT
        if self.restore_best and self.best_step != trainer.step and path.is_file():
            load_weights(trainer, path)
            trainer.say(f"restored the best held-out checkpoint (step {self.best_step})")
            out["restored_best"] = True
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "best": self.best,
            "flat": self.flat,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.flat = state["best"], state["flat"]
        self.level = state.get("level", self.best)  # checkpoints from before the split
        self.best_step, self.best_epoch = state.get("best_step"), state.get("best_epoch")


def save_weights(trainer: Run, path: Path) -> None:
    """What the model computes at this step: its weights, the losses' and TCM's margins.

    Margins are plain attributes of the TCM loss (calibrated runs move them), not part
    of its state dict, so they are saved beside it.
    """
    margins = trainer.final_margins()
    state = {
        "step": trainer.step,
        "model": trainer.model.state_dict(),
        "losses": trainer.losses.state_dict(),
        "margins": {k: margins[k] for k in ("margin_plus", "margin_minus")} if margins else None,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_weights(trainer: Run, path: Path) -> None:
    """Put back what :func:`save_weights` wrote (optimizer and history stay as they are)."""
    state = torch.load(path, map_location=trainer.device, weights_only=False)
    trainer.model.load_state_dict(state["model"])
    trainer.losses.load_state_dict(state["losses"])
    margins = state.get("margins")
    if margins:
        for loss in trainer.losses.values():
            if hasattr(loss, "set_margins"):
                loss.set_margins(margins["margin_plus"], margins["margin_minus"])
