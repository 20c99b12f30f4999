"""Bounded tenant labels that every replica and every restart agree on.

Prometheus series must not grow without bound with the number of tenants, and a
tenant's label must be the same on every replica (Prometheus sums counters by
``tenant`` across them) and after a restart (else its history splits). So the label
is a pure function of the tenant and of the set of tenants in the store, which every
replica reads from the same store:

- while the store holds at most ``max_named`` tenants, every tenant is labelled with
  its own name;
- beyond that, the ``max_named`` tenants with the smallest hash (blake2b of the name)
  keep their name, and every other tenant is labelled ``_bucket-NN`` with NN = its hash
  mod ``buckets``. A tenant name cannot start with ``_`` (server/storage/base.py), so a
  bucket never collides with a tenant.

Creating or deleting a tenant beyond the cap moves at most one tenant across the
named/bucket boundary (the one whose hash rank crosses ``max_named``). Consumers that
keep state per label see :attr:`TenantLabels.generation` change and drop the state of
names that are no longer labels; counters of a label never go down, they just stop
growing (a moved tenant's new series starts at 0, which ``rate()`` reads correctly).
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Iterable

BUCKET_PREFIX = "_bucket-"
DEFAULT_MAX_NAMED = 1000
DEFAULT_BUCKETS = 100


def tenant_hash(tenant: str) -> int:
    """64-bit blake2b of the tenant name: the same in every process and Python version."""
    digest = hashlib.blake2b(tenant.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def bucket_label(tenant: str, buckets: int) -> str:
    """The bucket label of ``tenant``: a function of the name alone."""
    return _bucket(tenant_hash(tenant), buckets)


def _bucket(name_hash: int, buckets: int) -> str:
    return f"{BUCKET_PREFIX}{name_hash % buckets:0{len(str(buckets - 1))}d}"


def is_bucket(label: str) -> bool:
    return label.startswith(BUCKET_PREFIX)


class TenantLabels:
    """Maps tenant names to at most ``max_named`` names plus ``buckets`` bucket labels.

    The server tells it the store's tenants (:meth:`sync` at start, after each store
    refresh and when it meets a tenant created elsewhere, :meth:`add` / :meth:`remove`
    on Create/DeleteTenant). :meth:`label` of a tenant it was not told about adds it:
    a LiveMonitor used on its own learns its tenants that way (and a tenant it learns
    late may move others across the cap, which the server avoids by syncing first).
    """

    def __init__(self, max_named: int = DEFAULT_MAX_NAMED, buckets: int = DEFAULT_BUCKETS) -> None:
        if max_named < 0:
            raise ValueError(f"max_tenant_labels must be >= 0, got {max_named}")
        if buckets < 1:
            raise ValueError(f"tenant label buckets must be >= 1, got {buckets}")
        self.max_named = max_named
        self.buckets = buckets
        self._hashes: dict[str, int] = {}
        self._order: list[tuple[int, str]] = []  # (hash, name), ascending: the hash order
        self._cutoff: tuple[int, str] | None = None  # the last named one; None: all named
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """Bumped whenever a known tenant's label changed or a tenant was removed."""
        return self._generation

    def label(self, tenant: str) -> str:
        """The label of ``tenant``: its name when it is among the named, else its bucket."""
        if not tenant:
            raise ValueError("tenant must be a non-empty string")
        with self._lock:
            if tenant not in self._hashes:
                h = self._hashes[tenant] = tenant_hash(tenant)
                bisect.insort(self._order, (h, tenant))
                self._recut()
            return self._label(tenant)

    def get(self, tenant: str) -> str | None:
        """The label of a known tenant, or None; never adds one."""
        with self._lock:
            return self._label(tenant) if tenant in self._hashes else None

    def add(self, tenant: str) -> str:
        """A tenant was created: the same as :meth:`label`."""
        return self.label(tenant)

    def remove(self, tenant: str) -> None:
        """A tenant was deleted: it no longer takes a named place (idempotent)."""
        with self._lock:
            h = self._hashes.pop(tenant, None)
            if h is not None:
                self._order.pop(bisect.bisect_left(self._order, (h, tenant)))
                self._recut(changed=True)

    def sync(self, tenants: Iterable[str]) -> None:
        """The store's tenants as they are now (other replicas' Admin calls included)."""
        wanted = set(tenants)
        with self._lock:
            if wanted == self._hashes.keys():
                return
            gone = bool(self._hashes.keys() - wanted)
            self._hashes = {t: self._hashes.get(t) or tenant_hash(t) for t in wanted}
            self._order = sorted((h, t) for t, h in self._hashes.items())
            self._recut(changed=gone)

    def values(self) -> list[str]:
        """Every label in use: the named tenants, then the buckets that hold a tenant."""
        with self._lock:
            labels = {self._label(t) for t in self._hashes}
        return sorted(labels, key=lambda label: (is_bucket(label), label))

    def _label(self, tenant: str) -> str:
        if self.max_named > 0 and (
            self._cutoff is None or (self._hashes[tenant], tenant) <= self._cutoff
        ):
            return tenant
        return _bucket(self._hashes[tenant], self.buckets)

    def _recut(self, changed: bool = False) -> None:
        """The named ones are the first ``max_named`` of the hash order. Labels of known
        tenants change only when that boundary moves (or one was removed)."""
        over = len(self._order) > self.max_named > 0
        cutoff = self._order[self.max_named - 1] if over else None
        if changed or cutoff != self._cutoff:
            self._generation += 1
        self._cutoff = cutoff
