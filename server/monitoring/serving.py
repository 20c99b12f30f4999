"""Serving metrics, named exactly as docs/METRICS.md ("Serving") says.

Everything lives in one :class:`~prometheus_client.CollectorRegistry` owned by the
server, so tests can run several servers in one process and the live monitor
(server/monitoring/) registers its gauges next to these.

No prometheus_client metric here carries a ``tenant`` label. The few per-tenant series
(gallery size, normalisation state) are computed at scrape time from the store's
tenants, under the labels of the shared :class:`TenantLabels` (server/monitoring/labels.py),
so a deleted tenant's series are gone at the next scrape and nothing needs ``remove()``.
Decisions and top-1 scores per tenant were cut (issue 21): at 41 histogram buckets they
were two thirds of every tenant's series; the monitor's counters count decisions per
tenant and target, and its drift gauge watches each tenant's top-1 scores.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.monitoring.labels import TenantLabels

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SIMILARITY = tuple(round(-1 + 0.05 * i, 2) for i in range(41))


class _GalleryItems(Collector):
    """``tcm_gallery_items{tenant}``, summed per bounded label at scrape time."""

    def __init__(self, sizes: Callable[[], dict[str, int]], labels: TenantLabels) -> None:
        self._sizes = sizes
        self._labels = labels

    def collect(self):
        family = GaugeMetricFamily("tcm_gallery_items", "enrolled items", labels=["tenant"])
        totals: dict[str, int] = defaultdict(int)
        for tenant, size in self._sizes().items():
            totals[self._labels.label(tenant)] += size
        for label, size in totals.items():
            family.add_metric([label], size)
        yield family


@dataclass(frozen=True)
class TenantNormalization:
    """What ``tcm_norm_*`` exports for one tenant."""

    active: bool
    shift: float  # raw threshold - served threshold at the default target FAR


class _Normalization(Collector):
    """``tcm_norm_active`` and ``tcm_norm_threshold_shift`` per tenant label.

    Tenants sharing a bucket label are summed (active maps) and their shifts averaged.
    A tenant's tail pairs are in GetTenant (``tail_pairs``), not in the metrics.
    """

    def __init__(
        self, stats: Callable[[], dict[str, TenantNormalization]], labels: TenantLabels
    ) -> None:
        self._stats = stats
        self._labels = labels

    def collect(self):
        groups: dict[str, list[TenantNormalization]] = defaultdict(list)
        for tenant, value in self._stats().items():
            groups[self._labels.label(tenant)].append(value)
        active = GaugeMetricFamily(
            "tcm_norm_active", "tenants whose score normalisation map is active", labels=["tenant"]
        )
        shift = GaugeMetricFamily(
            "tcm_norm_threshold_shift",
            "tenant's raw similarity threshold minus the served threshold (default target)",
            labels=["tenant"],
        )
        for label, values in sorted(groups.items()):
            active.add_metric([label], sum(v.active for v in values))
            shift.add_metric([label], sum(v.shift for v in values) / len(values))
        yield from (active, shift)


class ServerMetrics:
    """The serving metrics of docs/METRICS.md on ``registry``."""

    def __init__(self, registry: CollectorRegistry, labels: TenantLabels | None = None) -> None:
        self.registry = registry
        self.labels = labels or TenantLabels()
        ns = "tcm"
        self.requests = Counter(
            "requests", "finished RPCs", ["method", "code"], namespace=ns, registry=registry
        )
        self.request_seconds = Histogram(
            "request_duration_seconds",
            "whole call, server side",
            ["method"],
            namespace=ns,
            buckets=_LATENCY,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "stage_duration_seconds",
            "per image: decode, queue, embed, search",
            ["stage"],
            namespace=ns,
            buckets=_LATENCY,
            registry=registry,
        )
        self.batch_size = Histogram(
            "embed_batch_size",
            "images per onnxruntime call",
            namespace=ns,
            buckets=_BATCH,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "queue_depth", "images waiting for the embedder", namespace=ns, registry=registry
        )
        self.decisions = Counter(
            "decisions", "Match decisions", ["decision"], namespace=ns, registry=registry
        )
        self.top1 = Histogram(
            "top1_similarity",
            "cosine similarity of the best gallery item per query",
            namespace=ns,
            buckets=_SIMILARITY,
            registry=registry,
        )
        self.threshold = Gauge(
            "threshold_similarity",
            "served similarity threshold per calibrated target FAR",
            ["target_far"],
            namespace=ns,
            registry=registry,
        )
        self.target_far = Gauge(
            "target_far", "the server's default target FAR", namespace=ns, registry=registry
        )
        self.served_targets = Gauge(
            "served_target_far",
            "each calibrated target FAR served, as a number (its target_far label's value)",
            ["target_far"],
            namespace=ns,
            registry=registry,
        )
        self.model = Info("model", "served model and calibration", namespace=ns, registry=registry)
        self.reloads = Counter(
            "reloads", "model/calibration reloads", ["result"], namespace=ns, registry=registry
        )
        for result in ("ok", "error"):  # export zeros before the first reload
            self.reloads.labels(result)
        for decision in ("match", "no_match"):
            self.decisions.labels(decision)

    def watch_galleries(self, sizes: Callable[[], dict[str, int]]) -> None:
        """Export ``tcm_gallery_items`` from ``sizes()`` (tenant -> items) at scrape time."""
        self.registry.register(_GalleryItems(sizes, self.labels))

    def watch_normalization(self, stats: Callable[[], dict[str, TenantNormalization]]) -> None:
        """Export the per-tenant ``tcm_norm_*`` gauges from ``stats()`` at scrape time."""
        self.registry.register(_Normalization(stats, self.labels))

    def decision(self, matched: bool, top1: float) -> None:
        self.decisions.labels("match" if matched else "no_match").inc()
        self.top1.observe(top1)

    def served(self, thresholds: dict[float, float], default_far: float, info: dict) -> None:
        """Publish the thresholds, default FAR and model identity now being served."""
        self.threshold.clear()
        self.served_targets.clear()
        for far, similarity in thresholds.items():
            self.threshold.labels(f"{far:g}").set(similarity)
            self.served_targets.labels(f"{far:g}").set(far)
        self.target_far.set(default_far)
        self.model.info(info)
