"""A bounded memory of recent decisions, so Feedback can name one by its id.

Only the last ``capacity`` decisions are kept (oldest forgotten first): feedback
arrives soon after a decision or not at all, and memory must not grow with traffic.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    tenant: str
    matched: bool
    monitored: bool = True  # made at the monitored (default) target FAR


class DecisionStore:
    """decision_id -> (tenant, matched, monitored), bounded and thread-safe."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("decision store capacity must be >= 1")
        self.capacity = capacity
        self._items: OrderedDict[str, Decision] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, tenant: str, matched: bool, monitored: bool = True) -> str:
        """Remember a decision; returns its new unguessable id."""
        decision_id = secrets.token_hex(12)
        with self._lock:
            self._items[decision_id] = Decision(tenant, matched, monitored)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return decision_id

    def get(self, decision_id: str) -> Decision | None:
        with self._lock:
            return self._items.get(decision_id)

    def __len__(self) -> int:
        return len(self._items)
