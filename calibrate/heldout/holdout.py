"""Held-out evaluation of score normalisation: class parts, their pairs, rotations.

A tenant's classes are split at random into equal parts. In each rotation one part is
the tenant's *gallery* (its normalisation statistics come only from there), another
is the *oracle's* labelled calibration set, and the last is *evaluated*: its FAR and
TAR are counted on pairs inside it, so no identity that fed a statistic is ever
scored. Each part plays each role once and the counts of the rotations are pooled,
so every class is evaluated exactly once per split and every method (raw, normalised,
oracle) sees the same pairs with the same structure. docs/CONSISTENCY.md explains why
the structure must be the same: pooling rotations averages out which confusable
classes happen to land in a part, and it must do so for the floor and the methods
alike.

The pairs of a part are held explicitly: every impostor pair above the part's
``KEEP_LEVEL`` quantile (the region every threshold of interest lies in), all its
genuine pairs, and the histogram of all its impostor pairs. Scores are the project's
pair score (scorenorm.pairs.scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scorenorm import ScoreHistogram, TailMap, TailSettings, scores
from scorenorm.histogram import NBINS, bin_of
from scorenorm.tail_map import deployment_maps

KEEP_LEVEL = 0.05  # impostor pairs kept explicitly: the top 5% of each part
BLOCK = 1024
ROLES = ("gallery", "oracle", "evaluated")


@dataclass
class Scored:
    """Pairs of one evaluated part in some score space (raw or normalised).

    Impostor pairs are only those above the part's cutoff; ``imp_total`` counts all.
    Classes are dense ids of the whole set.
    """

    imp: np.ndarray
    imp_a: np.ndarray
    imp_b: np.ndarray
    imp_total: int
    gen: np.ndarray
    gen_class: np.ndarray

    def mapped(self, fn) -> Scored:
        return Scored(
            fn(self.imp), self.imp_a, self.imp_b, self.imp_total, fn(self.gen), self.gen_class
        )


@dataclass
class Part:
    """One class part of one tenant: its rows, explicit pairs and full impostor histogram."""

    tenant: int
    rows: np.ndarray
    classes: np.ndarray  # dense class ids in this part
    pairs: Scored  # raw scores
    hist: ScoreHistogram  # every impostor pair of the part
    class_impostors: np.ndarray  # per class of the whole set: impostor pairs in this part


def split_classes(
    labels: np.ndarray, tenants: np.ndarray, n_parts: int, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """Per tenant, its classes shuffled into ``n_parts`` near-equal parts (row indices)."""
    out = []
    for k in range(int(tenants.max()) + 1):
        rows = np.flatnonzero(tenants == k)
        classes = np.unique(labels[rows])
        rng.shuffle(classes)
        out.append([rows[np.isin(labels[rows], part)] for part in np.array_split(classes, n_parts)])
    return out


def part_pairs(x: np.ndarray, labels: np.ndarray, rows: np.ndarray, n_classes: int, tenant: int):
    """The explicit pairs of a part (two passes: histogram, then the kept tail)."""
    lab = labels[rows]
    xr = x[rows]
    counts = np.zeros(NBINS, np.int64)
    gen, gen_c = [], []
    for i0, s, same, upper in _blocks(xr, lab):
        counts += np.bincount(bin_of(s[upper & ~same]), minlength=NBINS)
        r, q = np.nonzero(upper & same)
        gen.append(s[r, q])
        gen_c.append(lab[i0 + r])
    hist = ScoreHistogram(counts, int(counts.sum()))
    cut = float(hist.quantile(KEEP_LEVEL)[0]) if hist.total else np.inf
    cut = float(np.nextafter(np.float32(cut), np.float32(-np.inf)))  # keep scores at the cut
    imp, ia, ib = [], [], []
    for i0, s, same, upper in _blocks(xr, lab):
        r, q = np.nonzero(upper & ~same & (s >= cut))
        imp.append(s[r, q])
        ia.append(lab[i0 + r])
        ib.append(lab[q])
    sizes = np.bincount(lab, minlength=n_classes)
    class_imp = sizes * (len(rows) - sizes)
    pairs = Scored(
        _cat(imp, np.float32),
        _cat(ia, np.int64),
        _cat(ib, np.int64),
        hist.total,
        _cat(gen, np.float32),
        _cat(gen_c, np.int64),
    )
    return Part(tenant, rows, np.unique(lab), pairs, hist, class_imp)


def _blocks(xr: np.ndarray, lab: np.ndarray):
    n = len(xr)
    cols = np.arange(n)
    for i0 in range(0, n, BLOCK):
        s = scores(xr[i0 : i0 + BLOCK], xr)
        upper = cols[None, :] > np.arange(i0, min(i0 + BLOCK, n))[:, None]
        same = lab[i0 : i0 + BLOCK, None] == lab[None, :]
        yield i0, s, same, upper


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def rotations(n_parts: int = 3) -> list[tuple[int, int, int]]:
    """(gallery, oracle, evaluated) part indices: each part takes each role once."""
    return [(r, (r + 1) % n_parts, (r + 2) % n_parts) for r in range(n_parts)]


# ------------------------------------------------------------------- thresholds
def threshold_at(values: np.ndarray, total: int, far: float) -> float | None:
    """t*(a) of docs/DESIGN.md on ``values`` (the top of ``total`` impostor scores).

    k = floor(a * total) may be accepted; t* is the smallest value above the
    (k+1)-th largest (the next float above it when that value is the top). None when
    a * total < 1, or when the (k+1)-th largest lies below the kept values.
    """
    k = int(np.floor(far * total))
    if k < 1 or k + 1 > len(values):
        return None
    top = -np.partition(-np.asarray(values, dtype=np.float64), k)[: k + 1]
    v = top.min()
    above = top[top > v]
    if len(above):
        return float(above.min())
    return float(np.nextafter(v, np.inf))


def accepted(values: np.ndarray, t: float) -> int:
    return int(np.count_nonzero(values >= t))


def per_class(values: np.ndarray, a: np.ndarray, b: np.ndarray, t: float, n: int) -> np.ndarray:
    """Accepted impostor pairs per class (each pair credited to both its classes)."""
    hit = values >= t
    return np.bincount(a[hit], minlength=n) + np.bincount(b[hit], minlength=n)


# ------------------------------------------------------------------- normalisation
def tail_maps(
    galleries: Sequence[ScoreHistogram], global_: ScoreHistogram, settings: TailSettings
) -> list[TailMap]:
    """Every tenant's tenant-tail map onto ``global_``, built as the server builds them
    (scorenorm.tail_map.deployment_maps: gallery pairs, the prior pooled over the
    tenants), so a held-out evaluation measures what is served."""
    return deployment_maps(galleries, global_, settings)


def pooled_histogram(hists: Sequence[ScoreHistogram]) -> ScoreHistogram:
    out = ScoreHistogram()
    for h in hists:
        out = out.merged(h)
    return out


def subsample(rows: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """A gallery of ``n_items`` random items of ``rows`` (the sample-size study)."""
    return rows if n_items >= len(rows) else rng.choice(rows, n_items, replace=False)


def online_histogram(
    x: np.ndarray,
    labels: np.ndarray,
    gallery: np.ndarray,
    queries: np.ndarray,
    raw_threshold: float,
    rng: np.random.Generator,
    per_query: int = 32,
) -> ScoreHistogram:
    """What a server's online tail samples would hold after ``queries`` were served
    against ``gallery`` (server/storage/tail_stats.py): per query, ``per_query`` random gallery
    items (with replacement), leaving out the top-1's identity when the query matched
    (top-1 >= the tenant's raw threshold). No query label is read."""
    g_lab = labels[gallery]
    s = scores(x[queries], x[gallery])
    top = s.argmax(axis=1)
    matched = s[np.arange(len(queries)), top] >= raw_threshold
    picks = rng.integers(0, len(gallery), size=(len(queries), per_query))
    values = np.take_along_axis(s, picks, axis=1)
    same = g_lab[picks] == g_lab[top][:, None]
    return ScoreHistogram.of(values[~(matched[:, None] & same)])
