"""A tenant's tail from gallery pairs, traffic and the deployment prior (scorenorm.evidence),
and the tenant-tail map of such an estimate."""

from __future__ import annotations

import numpy as np
import pytest

from scorenorm import ScoreHistogram, TailSettings
from scorenorm.evidence import (
    EvidenceSettings,
    Survival,
    own_evidence,
    prior_of,
    tenant_survival,
)
from scorenorm.tail_map import map_of_survival


def _hist(rng: np.random.Generator, n: int, loc: float = 0.2, scale: float = 0.12):
    return ScoreHistogram.of(np.clip(rng.normal(loc, scale, n), -1, 1).astype(np.float32))


def test_survival_of_a_histogram_reads_its_quantiles():
    rng = np.random.default_rng(0)
    h = _hist(rng, 100_000)
    s = Survival.of_histogram(h)
    for p in (0.1, 1e-2, 1e-3):
        assert float(s.at(s.quantile(p)[0])) == pytest.approx(p, rel=0.02)
    assert np.isnan(s.quantile(1e-7)[0])  # deeper than any pair: unknown, not invented


def test_traffic_share_is_capped():
    rng = np.random.default_rng(1)
    gallery = _hist(rng, 1000)
    traffic = Survival.of_histogram(_hist(rng, 1_000_000, loc=0.5))
    settings = EvidenceSettings(traffic_share=0.8, prior_pairs=2000)
    own = own_evidence(gallery, traffic, settings)
    # the traffic makes up at most 80% of what the estimate rests on: gallery + prior
    assert own.pairs - 1000 == pytest.approx(4 * (1000 + 2000))
    assert own_evidence(gallery, None, settings).pairs == 1000
    assert own_evidence(gallery, traffic, EvidenceSettings(traffic_share=0)).pairs == 1000


def test_beyond_its_support_a_tenant_follows_the_prior_shape():
    rng = np.random.default_rng(2)
    settings = EvidenceSettings(prior_pairs=2000)
    own = Survival.of_histogram(_hist(rng, 3000, loc=0.3))
    prior = Survival.of_histogram(_hist(rng, 2_000_000, loc=0.2))
    mine = tenant_survival(own, prior, prior, settings)
    edge = own.support_edge(settings.min_errors)
    deep = np.arange(edge + 10, edge + 200, 20)
    ratio = mine.values[deep] / prior.values[deep]
    assert np.allclose(ratio, ratio[0])  # the shift held in quantile space
    assert ratio[0] > 1  # and it is the tenant's heavier tail that is held
    assert tenant_survival(Survival(np.zeros(4097), 0.0), prior, prior, settings).values[
        edge
    ] == pytest.approx(prior.values[edge])


def test_prior_is_the_typical_tenant_not_the_heaviest():
    rng = np.random.default_rng(3)
    light = [Survival.of_histogram(_hist(rng, 50_000, loc=0.2)) for _ in range(4)]
    heavy = Survival.of_histogram(_hist(rng, 50_000, loc=0.5))
    reference = Survival.of_histogram(_hist(rng, 1_000_000))
    prior = prior_of([*light, heavy], reference, EvidenceSettings())
    t = float(light[0].quantile(1e-3)[0])
    arithmetic = np.mean([s.at(t) for s in [*light, heavy]])
    assert float(prior.at(t)) < arithmetic / 3
    assert prior_of([], reference, EvidenceSettings()) is None


def test_map_of_an_estimate_sends_its_quantiles_onto_the_global_ones():
    rng = np.random.default_rng(4)
    global_ = _hist(rng, 2_000_000, loc=0.1)
    tenant = Survival.of_histogram(_hist(rng, 200_000, loc=0.3))
    settings = TailSettings(top_level=0.02)
    mapping = map_of_survival(tenant, global_, settings)
    assert mapping.active
    g = Survival.of_histogram(global_)
    for p in (1e-2, 1e-3):
        raw = float(mapping.inverse(g.quantile(p)[0]))
        assert float(tenant.at(raw)) == pytest.approx(p, rel=0.1)
    thin = Survival.of_histogram(_hist(rng, 1000))
    assert not map_of_survival(thin, global_, settings).active  # 1,000 < 1,500 pairs
