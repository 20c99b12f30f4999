"""The impostor pairs of a gallery, scored the way every part of the project scores them.

A pair's score is the float64 inner product of the two float32 embeddings rounded
once to float32 (calibrate/engine/sweep.py defines it so); computed in float64 it does not
depend on how pairs are grouped, so a histogram built pair by pair while items come
and go equals the one rebuilt from scratch after a restart.
"""

from __future__ import annotations

import numpy as np

from scorenorm.histogram import NBINS, ScoreHistogram, bin_of

BLOCK = 1024


def scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) pair scores: float64 products, rounded once to float32."""
    a64 = np.asarray(a, dtype=np.float32).astype(np.float64)
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    return (a64 @ b64.T).astype(np.float32)


def cross_identity_counts(
    x: np.ndarray, ids: np.ndarray, y: np.ndarray, y_ids: np.ndarray
) -> np.ndarray:
    """Per-bin counts of the pairs (x_i, y_j) whose identities differ."""
    counts = np.zeros(NBINS, np.int64)
    for i0 in range(0, len(x), BLOCK):
        s = scores(x[i0 : i0 + BLOCK], y)
        other = ids[i0 : i0 + BLOCK, None] != y_ids[None, :]
        counts += np.bincount(bin_of(s[other]), minlength=NBINS)
    return counts


def gallery_histogram(vectors: np.ndarray, identities: np.ndarray) -> ScoreHistogram:
    """Every unordered pair of gallery items with different identities."""
    ids = np.asarray(identities)
    counts = np.zeros(NBINS, np.int64)
    for i0 in range(0, len(vectors), BLOCK):
        rows = vectors[i0 : i0 + BLOCK]
        s = scores(rows, vectors[i0:])  # each unordered pair once: columns from i0 on
        keep = ids[i0 : i0 + BLOCK, None] != ids[None, i0:]
        keep &= np.arange(i0, i0 + len(rows))[:, None] < np.arange(i0, len(vectors))[None, :]
        counts += np.bincount(bin_of(s[keep]), minlength=NBINS)
    return ScoreHistogram(counts, int(counts.sum()))
