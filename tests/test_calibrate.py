"""calibrate.evaluate against a dense, fully sorted implementation of the definitions."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate import CalibrationInputError, evaluate
from contracts import load_calibration, save_calibration
from imagesets import EmbeddingSet
from tests.test_calibrate_reference import Dense, threshold


def make_set(
    n: int = 400,
    classes: int = 40,
    tenants: int = 3,
    dim: int = 8,
    seed: int = 0,
    spread: float = 1.0,
) -> EmbeddingSet:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, dim))
    x = centers[labels] + spread * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return EmbeddingSet(
        "random",
        labels,
        tuple(f"c{i}" for i in range(classes)),
        labels % tenants,
        tuple(f"t{i}" for i in range(tenants)),
        x.astype(np.float32),
    )


def tied_set(n: int = 300, seed: int = 1) -> EmbeddingSet:
    """Embeddings drawn from 16 vectors of +-0.5: exact scores, heavy ties."""
    rng = np.random.default_rng(seed)
    codes = np.array([[(b >> i) & 1 for i in range(4)] for b in range(16)]) - 0.5
    pick = rng.integers(0, 16, n)
    labels = np.minimum(rng.geometric(0.15, n) - 1, 19)  # unbalanced, some singletons
    return EmbeddingSet(
        "tied",
        labels,
        tuple(f"c{i}" for i in range(20)),
        (labels * 7 + pick) % 2,
        ("a", "b"),
        codes[pick].astype(np.float32),
    )


def dense_of(es: EmbeddingSet) -> Dense:
    return Dense(es.embeddings, es.labels, es.tenants)


@pytest.mark.parametrize("block", [7, 64, 5000])
@pytest.mark.parametrize("make", [make_set, tied_set])
def test_thresholds_equal_full_sort(make, block):
    es = make()
    dense = dense_of(es)
    fars = (0.001, 0.01, 0.2)
    ev = evaluate(es, fars, block=block)
    for a, tr in zip(fars, ev.targets, strict=True):
        imp = dense.impostors()
        assert tr.threshold == threshold(imp, a)
        if tr.threshold is None:
            continue
        assert tr.accepted_impostors == int((imp >= tr.threshold).sum())
        assert tr.accepted_impostors <= tr.k
        assert tr.achieved_far == tr.accepted_impostors / len(imp)
        assert tr.tar == pytest.approx((dense.genuine() >= tr.threshold).mean(), abs=1e-12)
        for k, d in enumerate(tr.datasets):
            imp_k = dense.impostors(k)
            assert d.threshold == threshold(imp_k, a)
            assert d.far == pytest.approx((imp_k >= tr.threshold).mean(), abs=1e-15)
            assert d.frr == pytest.approx(1 - (dense.genuine(k) >= tr.threshold).mean(), abs=1e-12)
            if d.threshold is not None:
                assert d.threshold_drift == d.threshold - tr.threshold
            assert d.far_ratio == pytest.approx(d.far / a)


@pytest.mark.parametrize("make", [make_set, tied_set])
def test_opis_and_recall_equal_dense(make):
    es = make()
    dense = dense_of(es)
    ev = evaluate(es, (0.01,), far_range=(0.002, 0.05), grid_size=11, block=50)
    ref = dense.opis_all((0.002, 0.05), 11, 1.0, 0.05)
    assert ref is not None
    assert ev.overall.opis == pytest.approx(ref[0], rel=1e-9, abs=1e-15)
    assert ev.overall.eps_opis == pytest.approx(ref[1], rel=1e-9, abs=1e-15)
    assert ev.cross_dataset.opis == pytest.approx(ref[2], rel=1e-9, abs=1e-15)
    assert ev.cross_dataset.eps_opis == pytest.approx(ref[3], rel=1e-9, abs=1e-15)
    assert ev.recall_at_1 == pytest.approx(dense.recall_at_1())


def test_block_size_does_not_change_anything():
    es = make_set(n=500, seed=3)
    a = evaluate(es, (0.001, 0.05), block=13).to_document("0" * 64)
    b = evaluate(es, (0.001, 0.05), block=4096).to_document("0" * 64)
    a.pop("created_at"), b.pop("created_at")
    assert a == b


def test_document_is_valid_and_round_trips(tmp_path):
    ev = evaluate(make_set(), (0.001, 0.01))
    path = save_calibration(ev.to_document("a" * 64, "m.onnx"), tmp_path / "c.json")
    doc = load_calibration(path)
    assert doc.target(0.01).threshold == ev.target(0.01).threshold
    raw = doc.raw
    assert set(raw["reference"]["top1_similarity"]["counts"]) == {"t0", "t1", "t2"}
    counts = raw["reference"]["top1_similarity"]["counts"]["t0"]
    assert sum(counts) == ev.datasets[0].images
    lo, hi = raw["consistency"]["similarity_range"]
    assert lo <= ev.target(0.001).threshold <= hi


def test_singletons_are_excluded_and_counted():
    es = tied_set()
    ev = evaluate(es, (0.01,))
    for k, d in enumerate(ev.datasets):
        labels = es.labels[es.tenants == k]
        _, n = np.unique(labels, return_counts=True)
        assert d.excluded_classes == int((n < 2).sum())
        assert d.classes == int((n >= 2).sum())


def test_unmeasurable_target_is_reported_not_numbered():
    ev = evaluate(make_set(n=60, classes=6), (1e-6,))
    t = ev.targets[0]
    assert not t.measurable and t.threshold is None
    assert "not measurable" in t.warnings[0]


def test_several_sets_are_datasets():
    a, b = make_set(seed=1, tenants=1), make_set(seed=2, tenants=1)
    b = EmbeddingSet("other", b.labels, b.class_names, b.tenants, b.tenant_names, b.embeddings)
    ev = evaluate([a, b], (0.01,))
    assert [d.name for d in ev.datasets] == ["random", "other"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x, y: (x * 2, y), "not L2-normalised"),
        (lambda x, y: (np.where(np.arange(len(x))[:, None] == 3, np.nan, x), y), "NaN"),
        (lambda x, y: (x, np.zeros_like(y)), "at least 2 classes"),
    ],
)
def test_bad_embeddings_are_refused(mutate, message):
    es = make_set(tenants=1)
    x, y = mutate(es.embeddings, es.labels)
    bad = EmbeddingSet("bad", y, es.class_names, es.tenants, es.tenant_names, x)
    with pytest.raises(CalibrationInputError, match=message):
        evaluate(bad)


@pytest.mark.parametrize("far", [0.0, 1.0, -0.1, 2.0, float("nan")])
def test_bad_target_far(far):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        evaluate(make_set(), (far,))


def test_streamed_passes_equal_the_cached_tail(monkeypatch):
    from calibrate.engine import passes

    es = make_set(n=500, seed=6)
    cached = evaluate(es, (0.001, 0.05), bootstrap=20, block=64).to_document("0" * 64)
    monkeypatch.setattr(passes, "CACHE_BYTES", 0)  # passes 2 and 3 sweep the blocks again
    streamed = evaluate(es, (0.001, 0.05), bootstrap=20, block=64).to_document("0" * 64)
    cached.pop("created_at"), streamed.pop("created_at")
    assert cached == streamed


def test_a_too_high_sampled_cutoff_falls_back_to_all_scores(monkeypatch):
    from calibrate.engine.passes import Engine

    es = make_set(n=300, seed=7)
    want_ev = evaluate(es, (0.01, 0.2))
    want = want_ev.to_document("0" * 64)
    monkeypatch.setattr(Engine, "cutoff", lambda self, fraction, seed: 0.99)
    got_ev = evaluate(es, (0.01, 0.2))
    got = got_ev.to_document("0" * 64)
    # the plot grid may start lower after the fallback; everything measured is the same
    assert got["targets"] == want["targets"] and got["consistency"] == want["consistency"]
    assert got["reference"] == want["reference"]
    assert (
        got_ev.recall_at_1
        == want_ev.recall_at_1
        == Dense(es.embeddings, es.labels, es.tenants).recall_at_1()
    )


def test_rows_without_tail_scores_get_their_exact_best_impostor():
    """Pass 1 with a high cutoff: most rows' best impostor lies under it, yet is exact."""
    from calibrate.engine.passes import Engine
    from calibrate.engine.prepare import prepare
    from calibrate.engine.sweep import scores_cpu

    es = make_set(n=300, seed=9)
    dense = Dense(es.embeddings, es.labels, es.tenants)
    cut = float(np.quantile(dense.impostors(), 0.995))
    prep = prepare(es)
    first = Engine(prep, scores_cpu, 64).tail_pass(cut)
    s = dense.s.copy()
    s[
        (es.labels[:, None] == es.labels[None, :]) | (es.tenants[:, None] != es.tenants[None, :])
    ] = -np.inf
    want = s.max(axis=1)[prep.order]
    assert (want < cut).sum() > 100  # the fallback really ran for many rows
    np.testing.assert_array_equal(first.best_impostor, want)


def test_a_coarse_score_function_gives_the_same_numbers(monkeypatch):
    """A GPU GEMM (TF32) errs more; with its declared margin the result is unchanged."""
    import sys

    from calibrate.engine.sweep import scores_cpu

    def coarse(a, b):
        s = scores_cpu(a, b)
        noise = np.sin(np.arange(s.size, dtype=np.float32)).reshape(s.shape)
        return s + np.float32(1e-3) * noise

    coarse.min_margin = 4e-3
    es = make_set(n=400, seed=8)
    want = evaluate(es, (0.01, 0.05), block=100).to_document("0" * 64)
    module = sys.modules["calibrate.engine.evaluate"]
    monkeypatch.setattr(module, "score_function", lambda device: (coarse, "cpu"))
    got = evaluate(es, (0.01, 0.05), block=100).to_document("0" * 64)
    want.pop("created_at"), got.pop("created_at")
    assert got == want


def test_few_accepted_impostors_warn():
    ev = evaluate(make_set(n=200, classes=20), (0.001, 0.2))
    few, many = ev.targets
    assert few.accepted_impostors < 30 and "few errors" in few.warnings[0]
    assert many.accepted_impostors >= 30 and not many.warnings
