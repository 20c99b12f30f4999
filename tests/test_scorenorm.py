"""Score normalisation (scorenorm/): histograms, the tenant-tail map, pairs, AS-norm, registry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scorenorm
from scorenorm import (
    Cohort,
    ScoreHistogram,
    TailSettings,
    as_norm,
    build_map,
    cross_identity_counts,
    gallery_histogram,
    scores,
)
from scorenorm.histogram import NBINS, WIDTH


def impostor_like(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Similarities with a long upper tail, like impostor scores, moved by ``shift``."""
    return np.clip(np.tanh(rng.normal(0.2, 0.35, n)) + shift, -1, 0.9999)


def unit_rows(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------ histogram
def test_quantile_inverts_survival_and_matches_the_sample():
    v = impostor_like(np.random.default_rng(0), 200_000)
    h = ScoreHistogram.of(v)
    for p in (0.3, 0.05, 1e-2, 1e-3, 1e-4):
        q = h.quantile(p)[0]
        assert h.survival(q) == pytest.approx(p, rel=1e-9)
        assert abs(q - np.quantile(v, 1 - p)) <= WIDTH  # within one bin of the exact sample
    assert h.quantile(0.0)[0] >= v.max()
    assert np.isnan(h.quantile(1.5)[0])


def test_a_tail_histogram_knows_only_its_tail():
    v = impostor_like(np.random.default_rng(1), 100_000)
    cut = np.quantile(v, 0.95)
    tail = ScoreHistogram.of(v[v >= cut], total=len(v))
    full = ScoreHistogram.of(v)
    assert tail.quantile(1e-2)[0] == pytest.approx(full.quantile(1e-2)[0])
    assert np.isnan(tail.quantile(0.2)[0])  # deeper into the bulk than was binned
    with pytest.raises(ValueError, match="total"):
        ScoreHistogram(np.ones(NBINS, np.int64), total=3)


def test_histogram_document_round_trip_and_refusals():
    h = ScoreHistogram.of(impostor_like(np.random.default_rng(2), 5000), total=9000)
    back = ScoreHistogram.from_json(h.to_json())
    assert np.array_equal(back.counts, h.counts) and back.total == 9000
    with pytest.raises(ValueError, match="bins"):
        ScoreHistogram.from_json({**h.to_json(), "bins": 2048})


def test_adding_then_removing_pairs_restores_the_histogram_exactly():
    rng = np.random.default_rng(3)
    a, b = impostor_like(rng, 1000), impostor_like(rng, 300)
    h = ScoreHistogram.of(a)
    h.add(b)
    h.add(b, sign=-1)
    assert np.array_equal(h.counts, ScoreHistogram.of(a).counts) and h.total == len(a)


# ------------------------------------------------------------------ the map
def test_too_small_a_sample_gives_the_identity():
    settings = TailSettings()
    small = ScoreHistogram.of(impostor_like(np.random.default_rng(4), settings.min_pairs() - 1))
    glob = ScoreHistogram.of(impostor_like(np.random.default_rng(5), 100_000))
    m = build_map(small, glob, settings)
    assert not m.active
    s = np.linspace(-1, 1, 11)
    assert np.array_equal(m(s), s)


def test_a_shifted_tenant_is_mapped_onto_the_global_tail():
    """A tenant whose impostor scores sit 0.05 higher than the calibration's gets the
    same FAR as the calibration at every level after mapping, on fresh pairs."""
    rng = np.random.default_rng(6)
    glob = ScoreHistogram.of(impostor_like(rng, 400_000))
    tenant_gallery = ScoreHistogram.of(impostor_like(rng, 200_000, shift=0.05))
    m = build_map(tenant_gallery, glob, TailSettings(top_level=0.05))
    assert m.active
    fresh = impostor_like(rng, 400_000, shift=0.05)
    for a in (1e-2, 1e-3):
        t = glob.quantile(a)[0]  # the global threshold for FAR a
        raw_far = np.mean(fresh >= t)
        mapped_far = np.mean(m(fresh) >= t)
        assert raw_far > 2 * a  # one threshold over-accepts this tenant ...
        assert mapped_far == pytest.approx(a, rel=0.25)  # ... the map brings it to target
        assert m.shift(t) == pytest.approx(0.05, abs=0.01)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-0.2, 0.2), n=st.integers(2_000, 50_000))
def test_the_map_is_an_increasing_bijection_of_the_similarity_range(seed, shift, n):
    rng = np.random.default_rng(seed)
    glob = ScoreHistogram.of(impostor_like(rng, 50_000))
    m = build_map(ScoreHistogram.of(impostor_like(rng, n, shift)), glob, TailSettings())
    s = np.sort(rng.uniform(-1, 1, 500))
    out = m(s)
    assert np.all(np.diff(out) >= 0)  # rankings within a tenant never change
    assert np.all(np.diff(m.raw) > 0) and np.all(np.diff(m.norm) > 0)
    assert m(-1.0) == -1.0 and m(1.0) == 1.0 and np.all(np.abs(out) <= 1)
    np.testing.assert_allclose(m.inverse(out), s, atol=1e-9)


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="top_level"):
        TailSettings(top_level=1.5)
    with pytest.raises(ValueError, match="min_errors"):
        TailSettings(min_errors=0)
    assert TailSettings(min_errors=30, top_level=0.02).min_pairs() == 1500


# ------------------------------------------------------------------ pairs
def test_gallery_histogram_counts_every_cross_identity_pair_once():
    rng = np.random.default_rng(7)
    x = unit_rows(rng, 300)
    ids = rng.integers(0, 40, 300)
    s = (x.astype(np.float64) @ x.T.astype(np.float64)).astype(np.float32)
    i, j = np.triu_indices(300, 1)
    keep = ids[i] != ids[j]
    want = ScoreHistogram.of(s[i, j][keep])
    got = gallery_histogram(x, ids)
    assert np.array_equal(got.counts, want.counts) and got.total == want.total


def test_histogram_grown_item_by_item_equals_the_one_built_at_once():
    """What the server does on Enroll (add one item's pairs) equals a rebuild."""
    rng = np.random.default_rng(8)
    x, ids = unit_rows(rng, 120), rng.integers(0, 15, 120)
    h = gallery_histogram(x[:1], ids[:1])
    for n in range(1, 120):
        counts = cross_identity_counts(x[n : n + 1], ids[n : n + 1], x[:n], ids[:n])
        h = ScoreHistogram(h.counts + counts, h.total + int(counts.sum()))
    built = gallery_histogram(x, ids)
    assert np.array_equal(h.counts, built.counts) and h.total == built.total


def test_pair_scores_do_not_depend_on_grouping():
    rng = np.random.default_rng(9)
    x = unit_rows(rng, 64, d=128)
    whole = scores(x, x)
    one_by_one = np.vstack([scores(x[i : i + 1], x) for i in range(64)])
    assert np.array_equal(whole, one_by_one)


# ------------------------------------------------------------------ AS-norm
def test_as_norm_leaves_out_the_own_identity_and_is_symmetric():
    rng = np.random.default_rng(10)
    x, ids = unit_rows(rng, 200), np.repeat(np.arange(50), 4)
    cohort = Cohort(x, ids, top_k=10)
    own = cohort.stats(x[:4], ids[:4])
    blind = cohort.stats(x[:4])  # each row now finds itself (score 1) in its top-K
    assert np.all(blind.mean > own.mean)
    s = scores(x[:4], x[4:8])
    left, right = cohort.stats(x[:4], ids[:4]), cohort.stats(x[4:8], ids[4:8])
    np.testing.assert_allclose(
        as_norm(np.diag(s), left, right), as_norm(np.diag(s), right, left), rtol=1e-12
    )
    with pytest.raises(ValueError, match="top_k"):
        Cohort(x, ids, top_k=1)


# ------------------------------------------------------------------ registry
def test_registry_names_and_refusals():
    assert scorenorm.DEFAULT == "tenant-tail"
    assert {"none", "tenant-tail", "as-norm"} <= set(scorenorm.names())
    assert "as-norm" not in scorenorm.names(servable_only=True)
    with pytest.raises(ValueError, match="unknown normalisation 'zscore'"):
        scorenorm.info("zscore")
    with pytest.raises(ValueError, match="offline only"):
        scorenorm.choice(servable_only=True)("as-norm")
