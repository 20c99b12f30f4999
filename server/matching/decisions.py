"""A bounded memory of recent decisions, so Feedback can name one by its id.

Only the last ``capacity`` decisions are kept (oldest forgotten first): feedback
arrives soon after a decision or not at all, and memory must not grow with traffic.

With a ``secret`` shared by every replica (the Milvus store keeps one), a decision id
also carries the decision itself, signed: ``<24 hex random><flags><16 hex HMAC>``, so
Feedback reaching another replica than the one that decided is still recognised, and
a client cannot forge or alter one (the HMAC binds tenant, random part and flags).
"""

from __future__ import annotations

import hashlib
import hmac
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

    def __init__(self, capacity: int = 100_000, secret: bytes | None = None) -> None:
        if capacity < 1:
            raise ValueError("decision store capacity must be >= 1")
        self.capacity = capacity
        self.secret = secret
        self._items: OrderedDict[str, Decision] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, tenant: str, matched: bool, monitored: bool = True) -> str:
        """Remember a decision; returns its new unguessable id."""
        decision_id = secrets.token_hex(12)
        if self.secret:
            flags = str(int(matched) | int(monitored) << 1)
            decision_id += flags + self._mac(tenant, decision_id + flags)
        with self._lock:
            self._items[decision_id] = Decision(tenant, matched, monitored)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return decision_id

    def get(self, decision_id: str, tenant: str | None = None) -> Decision | None:
        """The decision, remembered here or (with a secret) signed for ``tenant``."""
        with self._lock:
            found = self._items.get(decision_id)
        if found is not None or not self.secret or tenant is None or len(decision_id) != 41:
            return found
        body, flags, mac = decision_id[:24], decision_id[24], decision_id[25:]
        if flags not in "0123" or not hmac.compare_digest(mac, self._mac(tenant, body + flags)):
            return None
        return Decision(tenant, bool(int(flags) & 1), bool(int(flags) & 2))

    def _mac(self, tenant: str, text: str) -> str:
        assert self.secret is not None
        digest = hmac.new(self.secret, f"{tenant}/{text}".encode(), hashlib.sha256)
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self._items)
