"""Serving metrics, named exactly as docs/METRICS.md ("Serving") says.

Everything lives in one :class:`~prometheus_client.CollectorRegistry` owned by the
server, so tests can run several servers in one process and the live monitor
(server/monitoring/) registers its gauges next to these. Tenant label values are
bounded by the same :class:`TenantLabels` the monitor uses (top-N by first traffic,
the rest ``other``), so the two sets of series agree.
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
    tail_pairs: int
    shift: float  # raw threshold - served threshold at the default target FAR


class _Normalization(Collector):
    """``tcm_norm_active``, ``tcm_norm_tail_pairs``, ``tcm_norm_threshold_shift`` per tenant.

    Tenants sharing the overflow label ``other`` are summed (active maps, pairs) and
    their shifts averaged.
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
        pairs = GaugeMetricFamily(
            "tcm_norm_tail_pairs",
            "impostor pairs behind the tenant's tail statistics",
            labels=["tenant"],
        )
        shift = GaugeMetricFamily(
            "tcm_norm_threshold_shift",
            "tenant's raw similarity threshold minus the served threshold (default target)",
            labels=["tenant"],
        )
        for label, values in sorted(groups.items()):
            active.add_metric([label], sum(v.active for v in values))
            pairs.add_metric([label], sum(v.tail_pairs for v in values))
            shift.add_metric([label], sum(v.shift for v in values) / len(values))
        yield from (active, pairs, shift)


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
            "decisions", "Match decisions", ["tenant", "decision"], namespace=ns, registry=registry
        )
        self.top1 = Histogram(
            "top1_similarity",
            "cosine similarity of the best gallery item per query",
            ["tenant"],
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
        self.model = Info("model", "served model and calibration", namespace=ns, registry=registry)
        self.reloads = Counter(
            "reloads", "model/calibration reloads", ["result"], namespace=ns, registry=registry
        )
        for result in ("ok", "error"):  # export zeros before the first reload
            self.reloads.labels(result)

    def watch_galleries(self, sizes: Callable[[], dict[str, int]]) -> None:
        """Export ``tcm_gallery_items`` from ``sizes()`` (tenant -> items) at scrape time."""
        self.registry.register(_GalleryItems(sizes, self.labels))

    def watch_normalization(self, stats: Callable[[], dict[str, TenantNormalization]]) -> None:
        """Export the per-tenant ``tcm_norm_*`` gauges from ``stats()`` at scrape time."""
        self.registry.register(_Normalization(stats, self.labels))

    def decision(self, tenant: str, matched: bool, top1: float) -> None:
        label = self.labels.label(tenant)
        self.decisions.labels(label, "match" if matched else "no_match").inc()
        self.top1.labels(label).observe(top1)

    def served(self, thresholds: dict[float, float], default_far: float, info: dict) -> None:
        """Publish the thresholds, default FAR and model identity now being served."""
        self.threshold.clear()
        for far, similarity in thresholds.items():
            self.threshold.labels(f"{far:g}").set(similarity)
        self.target_far.set(default_far)
        self.model.info(info)
