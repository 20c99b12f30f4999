"""1:N search: the false positive identification rate (FPIR) at a gallery size.

Match compares a query with every item of its tenant's gallery, so a query whose
identity is not enrolled is falsely matched when ANY of N impostor pairs clears the
threshold: with independent pairs FPIR ~ 1 - (1 - FAR)^N, which grows with N. A per-pair
target therefore promises a per-search rate only for one gallery size, and
calibrating for a target FPIR at a gallery size is a second operating mode
(docs/CALIBRATION.md, "Per pair or per search").

Measured here on held-out classes: for each dataset, a gallery of N random items of
some classes (calibrate/heldout/holdout.py parts) and queries of other classes; a query is a
false positive when its best gallery score passes the threshold. With normalisation
the tenant's map comes from that same gallery of N items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from calibrate.engine.prepare import prepare
from calibrate.heldout.holdout import rotations, split_classes
from imagesets import EmbeddingSet
from scorenorm import ScoreHistogram, TailSettings, gallery_histogram, scores
from scorenorm.tail_map import deployment_maps

PARTS = 3
MAX_QUERIES = 2000  # per dataset and rotation
LEVEL = 0.95


def per_pair_far(fpir: float, gallery_size: int) -> float:
    """The per-pair FAR a with 1 - (1 - a)^N = FPIR (pairs taken as independent)."""
    if not 0.0 < fpir < 1.0:
        raise ValueError(f"target FPIR must lie in (0, 1), got {fpir}")
    if gallery_size < 1:
        raise ValueError(f"gallery size must be >= 1, got {gallery_size}")
    return -math.expm1(math.log1p(-fpir) / gallery_size)


def independent_fpir(far: float, gallery_size: int) -> float:
    """1 - (1 - FAR)^N."""
    return -math.expm1(gallery_size * math.log1p(-far))


@dataclass(frozen=True)
class Fpir:
    fpir: float | None
    ci: tuple[float, float] | None
    false_matches: int
    queries: int

    def to_json(self) -> dict:
        return {
            "fpir": self.fpir,
            "ci": list(self.ci) if self.ci else None,
            "false_matches": self.false_matches,
            "queries": self.queries,
        }


@dataclass(frozen=True)
class DatasetFpir:
    name: str
    gallery_size: int  # items actually enrolled (smaller when a part has fewer)
    raw: Fpir
    normalized: Fpir | None


def held_out_fpir(
    embeddings: EmbeddingSet | Sequence[EmbeddingSet],
    thresholds: dict[float, float],
    gallery_size: int,
    *,
    global_tail: ScoreHistogram | None = None,
    settings: TailSettings | None = None,
    seed: int = 0,
    bootstrap: int = 200,
) -> dict[float, list[DatasetFpir]]:
    """{target FAR: per dataset FPIR at its threshold, raw and (with a tail) normalised}."""
    prep = prepare(embeddings)
    rng = np.random.default_rng([seed, gallery_size])
    parts = split_classes(prep.cls, prep.class_ds[prep.cls], PARTS, rng)
    out: dict[float, list[DatasetFpir]] = {a: [] for a in thresholds}
    drawn = [_draw(prep, rows, gallery_size, rng) for rows in parts]
    maps = _served_maps(prep, drawn, global_tail, settings or TailSettings())
    for k, (best, cls, _hists, size) in enumerate(drawn):
        for a, t in thresholds.items():
            raw = _fpir([b >= t for b in best], cls, bootstrap, rng)
            norm = None
            if maps[k]:
                hits = [b >= float(m.inverse(t)) for b, m in zip(best, maps[k], strict=True)]
                norm = _fpir(hits, cls, bootstrap, rng)
            out[a].append(DatasetFpir(prep.dataset_names[k], size, raw, norm))
    return out


def _draw(prep, rows, gallery_size: int, rng) -> tuple[list, list, list, int]:
    """One dataset's galleries and queries per rotation: (best scores per query, query
    classes, gallery pair histograms, the smallest gallery)."""
    best, cls, hists, size = [], [], [], gallery_size
    for g, _, e in rotations(PARTS):
        gal = rows[g] if len(rows[g]) <= gallery_size else rng.choice(rows[g], gallery_size, False)
        size = min(size, len(gal))
        queries = (
            rows[e] if len(rows[e]) <= MAX_QUERIES else rng.choice(rows[e], MAX_QUERIES, False)
        )
        if not len(gal) or not len(queries):
            continue
        best.append(scores(prep.x32[queries], prep.x32[gal]).max(axis=1))
        cls.append(prep.cls[queries])
        hists.append(gallery_histogram(prep.x32[gal], prep.cls[gal]))
    return best, cls, hists, size


def _served_maps(prep, drawn, global_tail, settings: TailSettings) -> list[list]:
    """Per dataset, the map of each drawn gallery as the server would serve it: the
    datasets of one rotation form one deployment (scorenorm.tail_map.deployment_maps)."""
    if global_tail is None:
        return [[] for _ in drawn]
    rounds = max((len(d[2]) for d in drawn), default=0)
    out: list[list] = [[] for _ in drawn]
    for r in range(rounds):
        members = [k for k, d in enumerate(drawn) if r < len(d[2])]
        maps = deployment_maps([drawn[k][2][r] for k in members], global_tail, settings)
        for k, m in zip(members, maps, strict=True):
            out[k].append(m)
    return out


def _fpir(hits: list[np.ndarray], cls: list[np.ndarray], n: int, rng) -> Fpir:
    if not hits:
        return Fpir(None, None, 0, 0)
    hit, c = np.concatenate(hits), np.concatenate(cls)
    ids, inv = np.unique(c, return_inverse=True)
    per_hit = np.bincount(inv, weights=hit, minlength=len(ids))
    per_n = np.bincount(inv, minlength=len(ids)).astype(float)
    ci = None
    if n > 0 and len(ids) > 1:
        draws = rng.integers(0, len(ids), size=(n, len(ids)))
        rates = per_hit[draws].sum(axis=1) / per_n[draws].sum(axis=1)
        tail = (1 - LEVEL) / 2 * 100
        lo, hi = np.percentile(rates, [tail, 100 - tail])
        ci = (float(lo), float(hi))
    return Fpir(float(hit.mean()), ci, int(hit.sum()), len(hit))
