"""Bounded tenant labels: Prometheus series must not grow with the number of tenants.

The first ``max_labels`` tenants seen keep their own name; every later tenant is reported
as ``other``. A tenant never changes label once assigned, because a counter series that
changed label mid-life would look like a reset to Prometheus' ``rate()``.
"""

from __future__ import annotations

import threading

OTHER = "other"


class TenantLabels:
    """Maps tenant names to at most ``max_labels`` distinct label values plus ``other``."""

    def __init__(self, max_labels: int = 20) -> None:
        if max_labels < 1:
            raise ValueError(f"max_tenant_labels must be >= 1, got {max_labels}")
        self._max = max_labels
        self._assigned: dict[str, str] = {}
        self._lock = threading.Lock()

    def label(self, tenant: str) -> str:
        """The label for ``tenant``: its own name while slots last, else ``other``."""
        if not tenant:
            raise ValueError("tenant must be a non-empty string")
        with self._lock:
            found = self._assigned.get(tenant)
            if found is not None:
                return found
            own = sum(1 for v in self._assigned.values() if v != OTHER)
            # A tenant literally named "other" must not claim its own slot: it would merge
            # with the overflow bucket anyway, so it goes there directly.
            value = tenant if own < self._max and tenant != OTHER else OTHER
            self._assigned[tenant] = value
            return value

    def get(self, tenant: str) -> str | None:
        """The label already given to ``tenant``, or None; never assigns a slot."""
        with self._lock:
            return self._assigned.get(tenant)

    def values(self) -> list[str]:
        """Every label handed out so far, in first-seen order, without duplicates."""
        with self._lock:
            return list(dict.fromkeys(self._assigned.values()))
