"""The label-free tail of a tenant's traffic (scorenorm.traffic) on synthetic scores whose
true impostor survival is known: it must put back what leaving out rank 1 removes."""

from __future__ import annotations

import numpy as np
import pytest

from scorenorm.histogram import NBINS, WIDTH, bin_of
from scorenorm.traffic import (
    EDGES,
    FISHER,
    REST_SAMPLE,
    SHIFT,
    Null,
    ScoredQueries,
    TrafficTail,
    rank1_null,
    residual,
    size_key,
)

N = 40


def _scores(rng: np.random.Generator, queries: int, genuine: float):
    """Queries x N items: impostor scores around a per-query location, and for a genuine
    query one high score at a random item. Returns (scores, impostor mask)."""
    mu = rng.normal(0.25, 0.04, (queries, 1))
    s = mu + rng.normal(0.0, 0.1, (queries, N))
    impostor = np.ones(s.shape, bool)
    is_genuine = rng.random(queries) < genuine
    cols = rng.integers(0, N, queries)
    rows = np.flatnonzero(is_genuine)
    s[rows, cols[rows]] = rng.normal(0.85, 0.04, len(rows))
    impostor[rows, cols[rows]] = False
    return np.clip(s, -1, 1), impostor


def _gallery_null(rng: np.random.Generator, galleries: int = 1) -> Null:
    """Galleries' own rank-1 residuals: each of N items against the other N - 1 items
    (all impostor pairs), pooled over ``galleries`` galleries for a sharper null."""
    out = []
    for _ in range(galleries):
        mu = rng.normal(0.25, 0.04, (N, 1))
        s = mu + rng.normal(0.0, 0.1, (N, N))
        np.fill_diagonal(s, -np.inf)
        out.append(rank1_null(s))
    return Null(np.concatenate([n.tops for n in out]), np.concatenate([n.locations for n in out]))


def _far(tail: TrafficTail, mu: np.ndarray, null: Null, t: float) -> float:
    fit = tail.fit(null)
    counts = np.bincount(bin_of(residual(t, mu, tail.scale)), minlength=NBINS).astype(float)
    return fit.far(counts, counts * N)


@pytest.mark.parametrize("scale", [SHIFT, FISHER])
@pytest.mark.parametrize("genuine", [0.2, 0.5, 0.8])
def test_far_matches_the_truth_where_leaving_out_rank_1_reads_low(genuine, scale):
    rng = np.random.default_rng(1)
    s, impostor = _scores(rng, 3000, genuine)
    t = float(np.quantile(s[impostor], 1 - 1e-2))  # the true 1e-2 level
    truth = (s[impostor] >= t).mean()
    tail = TrafficTail(scale=scale)
    mu, _ = tail.add_scores(s)
    estimate = _far(tail, mu, _gallery_null(rng, 10), t)
    # what the monitor did before: every pair but each query's rank-1 item
    top = np.zeros(s.shape, bool)
    top[np.arange(len(s)), s.argmax(axis=1)] = True
    naive = (s[~top] >= t).mean()
    assert estimate / truth == pytest.approx(1.0, abs=0.25)
    assert naive / truth < 0.9  # the bias this removes is real ...
    assert abs(np.log(estimate / truth)) < abs(np.log(naive / truth))  # ... and it is removed


def test_genuine_share_is_read_from_the_rank_1_scores():
    rng = np.random.default_rng(2)
    s, impostor = _scores(rng, 2000, 0.3)
    tail = TrafficTail()
    tail.add_scores(s)
    fit = tail.fit(_gallery_null(rng, 10))
    true_share = (~impostor).any(axis=1).mean()
    assert fit.genuine_share == pytest.approx(true_share, abs=0.06)


def test_evidence_adds_up_and_survives_json():
    rng = np.random.default_rng(3)
    a, _ = _scores(rng, 300, 0.5)
    b, _ = _scores(rng, 200, 0.5)
    one, two, both = TrafficTail(), TrafficTail(), TrafficTail()
    one.add_scores(a)
    two.add_scores(b)
    both.add_scores(np.concatenate([a, b]))
    merged = one.merged(two)
    np.testing.assert_allclose(merged.rest, both.rest)
    np.testing.assert_allclose(merged.locations, both.locations)
    assert merged.queries == both.queries == 500
    back = TrafficTail.from_json(merged.to_json())
    np.testing.assert_allclose(back.rest, merged.rest)
    assert back.merged(two, sign=-1).queries == pytest.approx(300)


def test_no_traffic_fits_nothing_and_no_gallery_means_an_even_share():
    assert TrafficTail().fit() is None
    rng = np.random.default_rng(4)
    s, _ = _scores(rng, 100, 0.5)
    tail = TrafficTail()
    tail.add_scores(s)
    assert tail.fit(None).genuine_share == 0.5
    tiny = Null(np.zeros(2), np.zeros(2))
    assert tail.fit(tiny).genuine_share == 0.5  # too small a gallery to judge by


def test_survival_is_a_survival():
    rng = np.random.default_rng(5)
    s, _ = _scores(rng, 500, 0.5)
    tail = TrafficTail()
    tail.add_scores(s)
    raw = tail.fit(_gallery_null(rng)).survival()
    assert raw[0] == pytest.approx(1.0, abs=1e-6)
    assert (np.diff(raw) <= 1e-12).all()
    assert raw[-1] == pytest.approx(0.0, abs=1e-6)


def test_a_gallery_with_several_items_per_identity_leaves_the_whole_identity_out():
    """Five items per identity: a genuine query scores high against all five. Left in,
    they would read as impostor exceedances; the rank-1 identity is left out whole."""
    rng = np.random.default_rng(7)
    identities = np.repeat(np.arange(N // 5), 5)
    mu = rng.normal(0.25, 0.04, (3000, 1))
    s = mu + rng.normal(0.0, 0.1, (3000, N))
    impostor = np.ones(s.shape, bool)
    genuine = np.flatnonzero(rng.random(3000) < 0.5)
    owner = rng.integers(0, N // 5, len(genuine))
    for q, who in zip(genuine, owner, strict=True):
        mine = identities == who
        s[q, mine] = rng.normal(0.85, 0.04, mine.sum())
        impostor[q, mine] = False
    s = np.clip(s, -1, 1)
    t = float(np.quantile(s[impostor], 1 - 1e-2))
    truth = (s[impostor] >= t).mean()
    tail = TrafficTail()
    locations, group = tail.add_scores(s, identities)
    assert (group == 5).all()
    null = []
    for _ in range(10):  # galleries of the same shape: items against other identities
        g = rng.normal(0.25, 0.04, (N, 1)) + rng.normal(0.0, 0.1, (N, N))
        g[identities[:, None] == identities[None, :]] = -np.inf
        null.append(rank1_null(g))
    null = Null(np.concatenate([n.tops for n in null]), np.concatenate([n.locations for n in null]))
    fit = tail.fit(null)
    counts = np.bincount(bin_of(residual(t, locations)), minlength=NBINS).astype(float)
    pairs = counts * (N - fit.genuine_share * 5)
    estimate = float((pairs * fit.residual_at(EDGES[:-1] + WIDTH / 2)).sum() / pairs.sum())
    assert estimate / truth == pytest.approx(1.0, abs=0.3)
    alone = TrafficTail()  # the same traffic read as if every item were its own identity
    alone.add_scores(s)
    assert alone.fit(null).far(counts, counts * N) / truth > 1.5


@pytest.mark.parametrize("items", [7, 40, 1500])
def test_locations_are_the_median_of_each_querys_rank_2_and_beyond(items: int):
    """The serving path's median (sort, no masked arrays) is np.nanmedian's, odd and even
    counts, with and without identities that leave out several items."""
    rng = np.random.default_rng(items)
    s = rng.uniform(-0.2, 0.9, (9, items))
    identities = rng.integers(0, max(items // 3, 2), items)
    for ids in (None, identities):
        scored = ScoredQueries.of(s, ids)
        best = s.argmax(axis=1)
        cols = np.arange(items)
        if items - 1 > 512:
            cols = np.arange(0, items, -(-items // 512))
        for q in range(len(s)):
            left = cols == best[q] if ids is None else ids[cols] == ids[best[q]]
            assert scored.location[q] == np.nanmedian(np.where(left, np.nan, s[q, cols]))


def _reference(scale: str, scores: np.ndarray, identities, weight: float) -> dict:
    """What adding queries must give, written query by query from the stated rules with
    np.nanmedian (as the code was before the one-pass reduction): the rank-1 identity
    left out, the rest read at a fixed stride beyond REST_SAMPLE items, each read score
    standing for its share, residuals about the median of the scores read."""
    n = scores.shape[1]
    ids = np.arange(n) if identities is None else np.asarray(identities)
    cols = np.arange(0, n, -(-n // REST_SAMPLE)) if n - 1 > REST_SAMPLE else np.arange(n)
    out = {"rest": np.zeros(NBINS), "top": np.zeros(NBINS), "locations": np.zeros(NBINS)}
    out["kept"] = out["grouped"] = 0.0
    for row in scores.astype(np.float64):
        best = int(np.argmax(row))
        mine = ids == ids[best]
        left = mine[cols]
        read = [c for c, gone in zip(cols, left, strict=True) if not gone]
        mu = float(np.nanmedian(row[read])) if read else float(row[best])
        out["top"][bin_of(residual(row[best], mu, scale))] += weight
        for c in read:
            out["rest"][bin_of(residual(row[c], mu, scale))] += (
                weight * (n - mine.sum()) / len(read)
            )
        out["locations"][bin_of(mu)] += weight
        out["kept"] += weight * float(n - mine.sum())
        out["grouped"] += weight * float(mine.sum())
    return out


@pytest.mark.parametrize("items, grouped", [(40, False), (40, True), (1500, True)])
def test_the_histograms_are_those_of_the_rules_query_by_query(items: int, grouped: bool):
    """One reduction of the batch, binned in each scale, against a per-query reference."""
    rng = np.random.default_rng(items)
    s = np.clip(rng.normal(0.25, 0.15, (23, items)), -1, 1)
    ids = rng.integers(0, items // 3, items) if grouped else None
    scored = ScoredQueries.of(s, ids, 0.5)
    for scale in (SHIFT, FISHER):
        tail = TrafficTail(scale=scale)
        tail.add(scored)
        want = _reference(scale, s, ids, 0.5)
        np.testing.assert_allclose(tail.rest, want["rest"], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(tail.locations, want["locations"])
        np.testing.assert_array_equal(tail.top[size_key(items)], want["top"])
        assert tail.kept == pytest.approx(want["kept"]) and tail.grouped == want["grouped"]
