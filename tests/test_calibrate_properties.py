"""Property tests: over random shapes, the streaming engine equals the full sort."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibrate import evaluate
from imagesets import EmbeddingSet
from tests.test_calibrate_reference import Dense, threshold


@st.composite
def embedding_sets(draw):
    n = draw(st.integers(8, 60))
    dim = draw(st.integers(2, 6))
    classes = draw(st.integers(2, 8))
    tenants = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    tenant_of_class = rng.integers(0, tenants, classes)
    if draw(st.booleans()):  # coarse values: many exactly tied scores
        x = rng.integers(-2, 3, size=(n, dim)).astype(np.float64)
        x[np.all(x == 0, axis=1), 0] = 1.0
    else:
        x = rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return EmbeddingSet(
        "prop",
        labels,
        tuple(f"c{i}" for i in range(classes)),
        tenant_of_class[labels],
        tuple(f"t{i}" for i in range(tenants)),
        x.astype(np.float32),
    )


def usable(es: EmbeddingSet) -> bool:
    """Each present tenant needs 2 classes and one class with 2 images."""
    for k in np.unique(es.tenants):
        _, n = np.unique(es.labels[es.tenants == k], return_counts=True)
        if len(n) < 2 or n.max() < 2:
            return False
    return True


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(embedding_sets(), st.integers(1, 40), st.sampled_from([0.02, 0.1, 0.3, 0.6]))
def test_streaming_thresholds_equal_full_sort(es, block, far):
    if not usable(es):
        return
    present = np.unique(es.tenants)
    dense = Dense(es.embeddings, es.labels, np.searchsorted(present, es.tenants))
    ev = evaluate(es, (far,), far_range=(0.05, 0.5), grid_size=5, block=block)
    t = ev.targets[0]
    assert t.threshold == threshold(dense.impostors(), far)
    for k, d in enumerate(t.datasets):
        assert d.threshold == threshold(dense.impostors(k), far)
    if t.threshold is not None:
        assert t.accepted_impostors == int((dense.impostors() >= t.threshold).sum())
