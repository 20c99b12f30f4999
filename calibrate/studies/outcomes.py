"""What the leave-tenant-out study produces, and the statistics read from it.

Shared by the study (leave_tenant_out.py, which fills these) and its report
(consistency_report.py, which reads them): the methods and the noise floor's name,
the goals of docs/CONSISTENCY.md, the per-split counts and the spread statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scorenorm import TailSettings

METHODS = ("raw", "tenant-tail", "as-norm")
FLOOR = "oracle"
WITHIN = 2.0  # a tenant is on target when FAR / a lies in [1/WITHIN, WITHIN]
GOAL_STD = 1.25  # std of log10(FAR / a) at most this many times the floor's
GOAL_POOLED = (0.8, 1.25)
GOAL_TAR_POINTS = 1.0
GOAL_TARGETS = (1e-2, 1e-3)


@dataclass(frozen=True)
class StudySettings:
    targets: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    splits: int = 5
    parts: int = 3
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    tail: TailSettings = field(default_factory=TailSettings)
    as_norm_top_k: int = 100
    bootstrap: int = 200
    gallery_sizes: tuple[int, ...] = (25, 50, 100, 200, 400, 800)


@dataclass
class Outcome:
    """One method at one target in one split: per-tenant and per-class counts."""

    acc: np.ndarray  # per tenant, accepted impostor pairs (pooled over rotations)
    pairs: np.ndarray  # per tenant, impostor pairs
    gen_acc: np.ndarray
    gen_pairs: np.ndarray
    class_acc: np.ndarray  # per class, accepted impostor pairs (both classes credited)
    class_pairs: np.ndarray  # per class, its impostor pairs in its evaluated part
    tar_at_equal_far: float = float("nan")  # raw pooled TAR at this method's pooled FAR


@dataclass
class SplitResult:
    outcomes: dict[tuple[str, float], Outcome]
    opis: dict[str, dict[str, float]]
    sizes: dict[tuple[int, float], tuple[np.ndarray, np.ndarray, int]]  # gallery-size study


# ------------------------------------------------------------------ statistics
def far_stats(acc: np.ndarray, pairs: np.ndarray, a: float) -> dict[str, float]:
    """Spread of per-tenant FAR at target ``a`` (DESIGN.md, "Consistency across tenants").

    A tenant with no accepted pair counts as half an accept (as the live spread gauge
    does), so one quiet tenant gives a large but finite spread.
    """
    if np.isnan(acc).any():
        nan = float("nan")
        return {"std_log10": nan, "max_min": nan, "within": nan, "pooled": nan}
    ratio = np.maximum(acc, 0.5) / pairs / a
    logs = np.log10(ratio)
    within = np.sum((ratio >= 1 / WITHIN) & (ratio <= WITHIN))
    return {
        "std_log10": float(logs.std()),
        "max_min": float(ratio.max() / ratio.min()),
        "within": float(within),
        "pooled": float(acc.sum() / pairs.sum() / a),
    }


def bootstrap_intervals(
    outcomes: list[Outcome], class_tenant: np.ndarray, a: float, n: int, seed: int
) -> dict[str, tuple[float, float]]:
    """95% class-bootstrap intervals of the split-averaged max/min and tenants within.

    Classes are resampled within their tenant (the same draw for every split);
    thresholds stay fixed. A tenant's FAR in a draw is sum_c w_c acc_c / sum_c w_c m_c.
    """
    if n < 1 or any(np.isnan(o.acc).any() for o in outcomes):
        return {}
    rng = np.random.default_rng(seed)
    tenants = int(class_tenant.max()) + 1
    members = [np.flatnonzero(class_tenant == k) for k in range(tenants)]
    stats = {"max_min": [], "within": [], "std_log10": []}
    for _ in range(n):
        w = np.zeros(len(class_tenant))
        for cs in members:
            w[cs] = np.bincount(rng.integers(0, len(cs), len(cs)), minlength=len(cs))
        draws = []
        for o in outcomes:
            acc = np.array([w[cs] @ o.class_acc[cs] / 2 for cs in members])
            pairs = np.array([w[cs] @ o.class_pairs[cs] / 2 for cs in members])
            draws.append(far_stats(acc, np.maximum(pairs, 1), a))
        for key, values in stats.items():
            values.append(np.mean([d[key] for d in draws]))
    return {k: tuple(np.percentile(v, [2.5, 97.5]).tolist()) for k, v in stats.items()}


@dataclass
class StudyResult:
    name: str
    tenants: list[str]
    settings: StudySettings
    splits: list[SplitResult]
    class_tenant: np.ndarray
    seconds: float

    def methods(self) -> list[str]:
        return [*self.settings.methods, FLOOR]

    def summary(self, method: str, a: float) -> dict[str, float]:
        per = [
            far_stats(sr.outcomes[(method, a)].acc, sr.outcomes[(method, a)].pairs, a)
            for sr in self.splits
        ]
        out = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
        tars, gaps = [], []
        for sr in self.splits:
            o = sr.outcomes[(method, a)]
            tar = o.gen_acc.sum() / o.gen_pairs.sum()
            tars.append(tar)
            gaps.append(100 * (tar - o.tar_at_equal_far))
        out["pooled_tar"] = float(np.mean(tars))
        out["tar_gap_points"] = float(np.mean(gaps))
        return out

    def per_tenant(self, method: str, a: float) -> tuple[np.ndarray, np.ndarray]:
        """Per tenant FAR / a and TAR, averaged over splits."""
        far = np.mean(
            [
                sr.outcomes[(method, a)].acc / sr.outcomes[(method, a)].pairs / a
                for sr in self.splits
            ],
            axis=0,
        )
        tar = np.mean(
            [
                sr.outcomes[(method, a)].gen_acc / sr.outcomes[(method, a)].gen_pairs
                for sr in self.splits
            ],
            axis=0,
        )
        return far, tar

    def intervals(self, method: str, a: float) -> dict[str, tuple[float, float]]:
        return bootstrap_intervals(
            [sr.outcomes[(method, a)] for sr in self.splits],
            self.class_tenant,
            a,
            self.settings.bootstrap,
            self.settings.seed,
        )
