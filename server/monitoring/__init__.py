"""Live monitoring of per-tenant FAR and threshold consistency (docs/MONITORING.md).

``LiveMonitor`` is the server's DecisionObserver: it keeps sliding windows of decisions
and feedback per tenant and exports the gauges of docs/METRICS.md at scrape time.
No torch here: the serving image must not need it.
"""

from server.monitoring.drift import ReferenceHistogram, load_references
from server.monitoring.estimators import spread_ratio, wilson_interval
from server.monitoring.labels import BUCKET_PREFIX, TenantLabels, bucket_label, is_bucket
from server.monitoring.live import LiveMonitor, far_label

__all__ = [
    "BUCKET_PREFIX",
    "LiveMonitor",
    "ReferenceHistogram",
    "TenantLabels",
    "bucket_label",
    "far_label",
    "is_bucket",
    "load_references",
    "spread_ratio",
    "wilson_interval",
]
