"""Live monitoring of per-tenant FAR and threshold consistency (docs/MONITORING.md).

``LiveMonitor`` is the server's DecisionObserver: it keeps sliding windows of decisions
and feedback per tenant and exports the gauges of docs/METRICS.md at scrape time.
No torch here: the serving image must not need it.
"""

from server.monitoring.drift import ReferenceHistogram, load_references
from server.monitoring.estimators import spread_ratio, wilson_interval
from server.monitoring.labels import OTHER, TenantLabels
from server.monitoring.live import LiveMonitor

__all__ = [
    "OTHER",
    "LiveMonitor",
    "ReferenceHistogram",
    "TenantLabels",
    "load_references",
    "spread_ratio",
    "wilson_interval",
]
