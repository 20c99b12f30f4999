"""The live monitor's label-free FAR (server/matching/statistics.py) against the true FAR.

Every decision hands the monitor two numbers: the expected impostor pairs at or above its
threshold among the tenant's sampled items, and the impostor pairs behind them
(scorenorm.traffic, fitted on this process's window of traffic). Here a real store and
real glyph embeddings (the tiny linear test model) are served traffic whose labels the
test knows: the window's summed estimate must read the true per-pair FAR of the same
pairs, where counting every pair except those of each query's rank-1 identity (what
the monitor did before) reads low, because for an impostor query that rank-1 pair is
the false accept. The study of this on out-of-domain tenants is
``python -m calibrate.studies.new_customer`` (docs/CONSISTENCY.md, "New customers").
"""

from __future__ import annotations

import numpy as np
import pytest

from embedding import OnnxEmbedder
from server.matching.statistics import StatisticsSettings, TenantStatistics
from server.storage import open_store
from server.storage.base import Item

SHA = "m" * 64


def serve(tmp_path, x, labels, gallery, queries, threshold):
    """Enrols ``gallery`` rows and serves ``queries`` rows; returns (estimate, truth,
    before, true exceedances) at the raw ``threshold``."""
    store = open_store("faiss", tmp_path, x.shape[1], SHA)
    store.load_all()
    try:
        g = store.create("t", None).gallery
        g.add([Item(f"g{i}", str(labels[i]), b"") for i in gallery], x[gallery], SHA)
        stats = TenantStatistics(
            store, "local", lambda: {"t": g.tail_snapshot()}, None, None, StatisticsSettings()
        )
        snap = g.tail_snapshot()
        evidence = []
        for start in range(0, len(queries), 16):  # micro-batches, as the server serves them
            rows = queries[start : start + 16]
            evidence += stats.observe("t", snap, x[rows], threshold)
    finally:
        store.close()
    s = x[queries] @ x[gallery].T
    impostor = labels[queries][:, None] != labels[gallery][None, :]
    top_label = labels[gallery][s.argmax(axis=1)]
    not_top = labels[gallery][None, :] != top_label[:, None]
    exceed = int(((s >= threshold) & impostor).sum())
    estimate = sum(e.exceedances for e in evidence) / sum(e.pairs for e in evidence)
    before = ((s >= threshold) & not_top).sum() / not_top.sum()
    return estimate, exceed / impostor.sum(), before, exceed


@pytest.fixture(scope="module")
def shipped(tiny_glyphs) -> np.ndarray:
    """The glyph images embedded by the shipped model: the estimator assumes an embedder
    that ranks a genuine item first, which the random linear test model does not."""
    from embedding.defaults import require_default_model

    return OnnxEmbedder(require_default_model(), device="cpu").embed(tiny_glyphs.pixels)


@pytest.mark.parametrize("per_class", [1, 4])
def test_label_free_far_reads_the_true_far_of_mostly_impostor_traffic(
    tiny_glyphs, shipped, tmp_path, per_class
):
    x = shipped
    labels = np.asarray(tiny_glyphs.labels)
    rng = np.random.default_rng(per_class)
    classes = rng.permutation(np.unique(labels))
    enrolled, unseen = classes[:40], classes[40:]
    gallery = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in enrolled]
    )
    others = np.setdiff1d(np.flatnonzero(np.isin(labels, enrolled)), gallery)
    strangers = np.flatnonzero(np.isin(labels, unseen))
    queries = rng.permutation(np.concatenate([rng.choice(others, 300), rng.choice(strangers, 900)]))
    impostor_scores = (x[queries] @ x[gallery].T)[
        labels[queries][:, None] != labels[gallery][None, :]
    ]
    threshold = float(np.quantile(impostor_scores, 1 - 0.02))  # the true 2% level
    estimate, truth, before, exceedances = serve(tmp_path, x, labels, gallery, queries, threshold)
    assert exceedances >= 100
    assert estimate / truth == pytest.approx(1.0, abs=0.5)  # within the factor 2
    assert before / truth < 0.8  # what leaving out rank 1 unchanged read
    assert abs(np.log(estimate / truth)) < abs(np.log(before / truth))
