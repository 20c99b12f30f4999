"""Calibration-aware TCM margins: put TCM's margins where the model's thresholds are.

TCM (Zhang et al. 2024) penalises genuine pairs below ``margin_plus`` and impostor pairs
above ``margin_minus`` with fixed constants (0.9 / 0.5 in the paper). On our glyph
models the thresholds for FAR 1e-2 .. 1e-4 sit at similarity 0.85 .. 0.99, far above
0.5, so the impostor term never touches the pairs that decide a match. Here the margins
follow the model's own operating range instead, measured with the project's calibrate
engine on classes held out from training:

    margin_minus = t(FAR_hi) - offset      (impostors in or near the operating range)
    margin_plus  = t(FAR_lo) + offset      (genuine pairs the strictest threshold rejects)

where t(a) is calibrate's exact threshold for global FAR a (pairs within tenants, as
served). The range is re-measured every ``every`` steps, because training moves it.

It starts after a warm-up. A randomly initialised network maps every image to nearly
the same point, so its "operating range" is [0.99999, 1]: margins set from it ask
every genuine pair to reach similarity 1 and no impostor to exceed it, which keeps the
embedding collapsed (measured: Recall@1 0.956 instead of 0.99 on the held-out classes
after 800 steps, with the range still at 0.996 .. 0.999). During ``warmup`` steps the
loss keeps the margins it was built with (the paper's), which spread the embedding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibrate import evaluate as calibrate_evaluate
from imagesets import EmbeddingSet, ImageSet
from train.callbacks import Callback, Run
from train.losses import TCMLoss


def operating_range(
    embeddings: np.ndarray,
    labels: np.ndarray,
    tenants: np.ndarray,
    tenant_names: tuple[str, ...],
    far_range: tuple[float, float] = (1e-4, 1e-2),
) -> tuple[float, float] | None:
    """(t at FAR_hi, t at FAR_lo) in similarity, from calibrate; None when not measurable."""
    dense = np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)
    names = tuple(str(c) for c in range(int(dense.max()) + 1))
    es = EmbeddingSet(
        "margin-calibration",
        dense,
        names,
        np.asarray(tenants, np.int64),
        tenant_names,
        np.ascontiguousarray(embeddings, dtype=np.float32),
    )
    ev = calibrate_evaluate(es, target_fars=(far_range[0],), far_range=far_range, grid_size=2)
    if ev.similarity_range is None:
        return None
    lo, hi = ev.similarity_range
    return float(lo), float(hi)


def margins_from_range(t_lo: float, t_hi: float, offset: float) -> tuple[float, float]:
    """(margin_plus, margin_minus) for a range, widened by ``offset``, within [-1, 1]."""
    plus = min(1.0, max(-1.0, t_hi + offset))
    minus = min(1.0, max(-1.0, t_lo - offset))
    return plus, minus


class CalibratedMargins(Callback):
    """From step ``warmup`` on, every ``every`` steps, set ``tcm``'s margins from the range
    measured on ``held_out``.

    ``momentum`` smooths the measured margins (0: take each measurement as is). Before
    ``warmup`` the loss keeps its own margins (see the module docstring for why). Logged
    per step through TCM's own statistics (the margins) and here (``range_lo``,
    ``range_hi``, at the steps where they were measured).
    """

    def __init__(
        self,
        tcm: TCMLoss,
        held_out: ImageSet,
        every: int = 100,
        warmup: int = 0,
        far_range: tuple[float, float] = (1e-4, 1e-2),
        offset: float = 0.0,
        momentum: float = 0.0,
    ) -> None:
        if every < 1:
            raise ValueError(f"margin calibration needs every >= 1 step, got {every}")
        if warmup < 0:
            raise ValueError(f"margin warm-up must be >= 0 steps, got {warmup}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"margin momentum must lie in [0, 1), got {momentum}")
        lo, hi = far_range
        if not 0.0 < lo < hi < 1.0:
            raise ValueError(f"margin FAR range must be 0 < low < high < 1, got {far_range}")
        self.tcm, self.held_out = tcm, held_out
        self.every, self.warmup, self.far_range = every, warmup, (float(lo), float(hi))
        self.offset, self.momentum = float(offset), float(momentum)
        self.measured: list[dict[str, float]] = []  # step, range_lo, range_hi, margins

    def on_fit_start(self, trainer: Run) -> None:
        if self.measured:  # resumed: put back the margins in force at the checkpoint
            last = self.measured[-1]
            self.tcm.set_margins(last["margin_plus"], last["margin_minus"])
        elif self.warmup == 0:
            self._calibrate(trainer, step=0)

    def on_step_end(self, trainer: Run, step: int) -> dict[str, float]:
        if step < self.warmup or (step - self.warmup) % self.every:
            return {}
        return self._calibrate(trainer, step)

    def _calibrate(self, trainer: Run, step: int) -> dict[str, float]:
        emb = trainer.embed(self.held_out)
        rng = operating_range(
            emb,
            self.held_out.labels,
            self.held_out.tenants,
            self.held_out.tenant_names,
            self.far_range,
        )
        if rng is None:
            trainer.say(f"step {step}: margin range not measurable on the held-out classes")
            return {}
        plus, minus = margins_from_range(*rng, self.offset)
        if self.measured and self.momentum:
            m = self.momentum
            plus = m * self.tcm.margin_plus + (1 - m) * plus
            minus = m * self.tcm.margin_minus + (1 - m) * minus
        self.tcm.set_margins(plus, minus)
        row = {
            "step": step,
            "range_lo": rng[0],
            "range_hi": rng[1],
            "margin_plus": plus,
            "margin_minus": minus,
        }
        self.measured.append(row)
        return {"range_lo": rng[0], "range_hi": rng[1]}

    def state_dict(self) -> dict[str, Any]:
        return {"measured": self.measured}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.measured = list(state["measured"])
