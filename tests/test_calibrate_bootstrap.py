"""Class-bootstrap intervals: seeded, bracketing the estimate, exact without resampling."""

from __future__ import annotations

import numpy as np
import pytest

import calibrate.engine.bootstrap as boot
from calibrate import evaluate
from tests.test_calibrate import make_set
from tests.test_calibrate_reference import Dense


def test_interval_brackets_the_estimate_and_is_seeded():
    es = make_set(n=600, classes=60, seed=4)
    a = evaluate(es, (0.01, 0.05), bootstrap=200, seed=1)
    b = evaluate(es, (0.01, 0.05), bootstrap=200, seed=1)
    for ta, tb in zip(a.targets, b.targets, strict=True):
        assert ta.ci == tb.ci
        lo, hi = ta.ci.far
        assert lo <= ta.achieved_far <= hi and lo < hi
        tlo, thi = ta.ci.threshold
        step = (a.targets[0].threshold - tlo) if tlo < ta.threshold else 0.05
        assert tlo - step <= ta.threshold <= thi + 0.05
        assert ta.ci.resamples == 200 and ta.ci.level == 0.95


def test_without_resampling_the_bootstrap_reproduces_the_point_estimate(monkeypatch):
    es = make_set(n=500, classes=50, seed=5)
    monkeypatch.setattr(boot, "class_weights", lambda prep, n, rng: np.ones((n, prep.n_classes)))
    ev = evaluate(es, (0.01, 0.03), bootstrap=5)
    imp = Dense(es.embeddings, es.labels, es.tenants).impostors()
    for t in ev.targets:
        assert t.ci.far == pytest.approx((t.achieved_far, t.achieved_far), rel=1e-12)
        lo, hi = t.ci.threshold
        assert lo == hi  # the smallest grid point accepting at most k
        assert (imp >= lo).sum() <= t.k
        assert abs(lo - t.threshold) <= 2 / 511


def test_no_bootstrap_no_interval():
    assert evaluate(make_set(), (0.01,)).targets[0].ci is None


def test_interval_in_document():
    ev = evaluate(make_set(), (0.01,), bootstrap=50)
    ci = ev.to_document("0" * 64)["targets"][0]["ci"]
    assert ci["resamples"] == 50 and ci["method"].startswith("class bootstrap")
    assert ci["far"][0] <= ci["far"][1]
