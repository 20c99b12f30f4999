"""A bounded memory of recent decisions, so Feedback can name one by its id.

Only the last ``capacity`` decisions are kept (oldest forgotten first): feedback
arrives soon after a decision or not at all, and memory must not grow with traffic.

A decision belongs to the tenant *instance* that made it: the tenant's name and its
incarnation (a random id made by CreateTenant, server/storage/base.py). After
DeleteTenant and a CreateTenant with the same name, ids of the old tenant are unknown
to the new one, so its feedback cannot land in the new tenant's statistics.

With a ``secret`` shared by every replica (the Milvus store keeps one), a decision id
also carries the decision itself, signed: ``<24 hex random><flag><16 hex target
FAR><16 hex HMAC>``, so Feedback reaching another replica than the one that decided is
still recognised, and a client cannot forge or alter one (the HMAC binds tenant,
incarnation, random part, flag and target).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

_RANDOM = 24  # hex characters of the random part
_SIGNED = _RANDOM + 1 + 16 + 16


@dataclass(frozen=True)
class Decision:
    tenant: str
    incarnation: str
    matched: bool
    target_far: float  # the calibrated target the decision was made at


class DecisionStore:
    """decision_id -> Decision, bounded and thread-safe."""

    def __init__(self, capacity: int = 100_000, secret: bytes | None = None) -> None:
        if capacity < 1:
            raise ValueError("decision store capacity must be >= 1")
        self.capacity = capacity
        self.secret = secret
        self._items: OrderedDict[str, Decision] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, tenant: str, incarnation: str, matched: bool, target_far: float) -> str:
        """Remember a decision; returns its new unguessable id."""
        decision_id = secrets.token_hex(_RANDOM // 2)
        if self.secret:
            body = decision_id + str(int(matched)) + struct.pack(">d", target_far).hex()
            decision_id = body + self._mac(tenant, incarnation, body)
        with self._lock:
            self._items[decision_id] = Decision(tenant, incarnation, matched, target_far)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return decision_id

    def get(self, decision_id: str, tenant: str, incarnation: str) -> Decision | None:
        """The decision when it was made by this tenant instance (remembered here, or
        with a secret, signed for it); None for any other id."""
        with self._lock:
            found = self._items.get(decision_id)
        if found is not None:
            return found if (found.tenant, found.incarnation) == (tenant, incarnation) else None
        if not self.secret or len(decision_id) != _SIGNED or not decision_id.isascii():
            return None  # (compare_digest refuses non-ASCII text)
        body, mac = decision_id[: _SIGNED - 16], decision_id[_SIGNED - 16 :]
        if not hmac.compare_digest(mac, self._mac(tenant, incarnation, body)):
            return None
        flag, far = body[_RANDOM], bytes.fromhex(body[_RANDOM + 1 :])
        return Decision(tenant, incarnation, flag == "1", struct.unpack(">d", far)[0])

    def _mac(self, tenant: str, incarnation: str, text: str) -> str:
        assert self.secret is not None
        message = f"{tenant}/{incarnation}/{text}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self._items)
