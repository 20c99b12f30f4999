"""Adaptive symmetric score normalisation (AS-norm) with a cohort from the tenant's gallery.

s' = ((s - mu_q) / sd_q + (s - mu_g) / sd_g) / 2, where mu and sd are the mean and
standard deviation of each side's top-K scores against the cohort (the tenant's
gallery items of other identities). It is the usual speaker-verification remedy for
per-model score offsets; here it is the alternative measured against the tenant-tail
mapping (docs/CONSISTENCY.md). Unlike that mapping it adapts to each query, so it can
reorder a tenant's candidates, and its scores are z-scores: a threshold must be
calibrated on AS-normed scores, not on similarities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scorenorm.pairs import BLOCK, scores

MIN_SD = 1e-6


@dataclass(frozen=True)
class SideStats:
    """Mean and standard deviation of each row's top-K cohort scores."""

    mean: np.ndarray
    sd: np.ndarray


@dataclass(frozen=True)
class Cohort:
    """The tenant's gallery as an AS-norm cohort."""

    vectors: np.ndarray
    identities: np.ndarray
    top_k: int = 100

    def __post_init__(self) -> None:
        if self.top_k < 2:
            raise ValueError(f"AS-norm needs top_k >= 2, got {self.top_k}")

    def stats(self, vectors: np.ndarray, identities: np.ndarray | None = None) -> SideStats:
        """Top-K statistics of ``vectors`` against the cohort, leaving out their own
        identity (a gallery item is never its own cohort) when ``identities`` is given."""
        k = min(self.top_k, len(self.vectors))
        means, sds = [], []
        for i0 in range(0, len(vectors), BLOCK):
            s = scores(vectors[i0 : i0 + BLOCK], self.vectors).astype(np.float64)
            if identities is not None:
                s[identities[i0 : i0 + BLOCK, None] == self.identities[None, :]] = -np.inf
            top = -np.partition(-s, k - 1, axis=1)[:, :k]
            top = np.where(np.isfinite(top), top, np.nan)
            means.append(np.nanmean(top, axis=1))
            sds.append(np.maximum(np.nanstd(top, axis=1), MIN_SD))
        return SideStats(np.concatenate(means), np.concatenate(sds))


def as_norm(raw: np.ndarray, left: SideStats, right: SideStats) -> np.ndarray:
    """AS-normed scores of pairs (left[i], right[i]) with raw similarity raw[i]."""
    raw = np.asarray(raw, dtype=np.float64)
    return 0.5 * ((raw - left.mean) / left.sd + (raw - right.mean) / right.sd)
