"""The boundary between serving and where galleries live: the protocol every backend keeps.

:class:`GalleryStore` (every tenant: created, found, dropped) hands out one
:class:`TenantGallery` per tenant; the types they exchange (:class:`Item`, :class:`Hit`,
:class:`SearchResult`, :class:`Tenant`), their errors and the tenant-name rule are
defined here once for both backends (server/storage/__init__.py picks one).

Either way the server decides: a backend returns items with raw cosine similarities,
and the threshold, the score normalisation and the label-free counts stay in our code
(server/matching/service.py). The contract both backends must keep is pinned down by
one test suite run against each (tests/test_gallery_contract.py).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np

from server.errors import StatusError
from server.storage.tail_stats import DEFAULT_CAPACITY, TenantTail

RETRY_AFTER = 1.0  # seconds: the hint sent when the gallery backend failed
# Matched against the WHOLE name (fullmatch): ``$`` would also accept a trailing newline,
# and the name becomes a folder name (faiss) or a partition key value (Milvus).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class GalleryError(ValueError):
    """The stored gallery cannot be loaded as asked; the message says why."""


class StaleModelError(RuntimeError):
    """The caller's embeddings come from another model than the gallery's (a reload raced)."""


class TenantError(ValueError):
    """Bad tenant name, or the tenant exists / does not exist."""


def check_name(name: str) -> str:
    """``name`` when it is a valid tenant name, else TenantError (the same rule for every store)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TenantError(
            f"invalid tenant name {name!r}: use 1-64 letters, digits, '_', '-', '.', "
            "starting with a letter or digit"
        )
    return name


class StoreUnavailableError(StatusError):
    """The backend cannot be reached or did not answer in time: nothing was decided or
    written. UNAVAILABLE, or DEADLINE_EXCEEDED when the backend was too slow; both with
    a retry hint."""

    def __init__(self, message: str, timeout: bool = False) -> None:
        code = grpc.StatusCode.DEADLINE_EXCEEDED if timeout else grpc.StatusCode.UNAVAILABLE
        super().__init__(code, message, RETRY_AFTER)
        self.timeout = timeout


@dataclass(frozen=True)
class Item:
    item_id: str
    label: str
    image: bytes


@dataclass(frozen=True)
class Hit:
    item_id: str
    label: str
    similarity: float


@dataclass(frozen=True)
class SearchResult:
    """Top-k neighbours of one query, best first. What the scores mean for a decision
    (threshold, normalisation, label-free statistics) is worked out above the store,
    in server/matching/."""

    neighbors: list[Hit]

    @property
    def top1(self) -> Hit | None:
        return self.neighbors[0] if self.neighbors else None


def identity(item_id: str, label: str) -> str:
    """Items with the same label are one identity; an unlabelled item is its own."""
    return label if label else "\0" + item_id


@dataclass(frozen=True)
class TailOptions:
    """How a gallery samples itself for its tenant's normalisation statistics."""

    capacity: int = DEFAULT_CAPACITY

    def new(self, dim: int) -> TenantTail:
        return TenantTail(dim, self.capacity)


@dataclass(frozen=True)
class TrafficRow:
    """One replica's published traffic evidence of one tenant (server/matching/statistics.py):
    cumulative, so the newest row of a (tenant, replica) replaces the older ones."""

    tenant: str
    replica: str
    stamp: int  # publication time, ns since the epoch
    blob: bytes  # scorenorm.traffic.TrafficTail.to_bytes()


class TenantGallery(Protocol):
    """One tenant's gallery, whichever backend holds it. Mutations are durable on return."""

    dim: int
    model_sha256: str
    reembedded: int  # items re-embedded on open because the model changed
    tail: TenantTail
    # a search with read_after >= this sees this gallery's writes so far; a tenant's
    # tokens only grow, across a delete and create too (clients keep the largest)
    write_token: int

    @property
    def size(self) -> int: ...

    @property
    def index_kind(self) -> str: ...

    def add(
        self, items: list[Item], embeddings: np.ndarray, model_sha256: str, replace: bool = False
    ) -> list[str | None]:
        """Per item None (added) or the gRPC status name of its refusal; ``replace``
        overwrites an existing id (idempotent upsert)."""

    def remove(self, item_ids: list[str]) -> tuple[list[str], list[str]]:
        """(removed, not found); visible to every search that starts after it returns."""

    def search(
        self, queries: np.ndarray, k: int, model_sha256: str, read_after: int = 0
    ) -> list[SearchResult]:
        """Top-k per query (raw cosine similarities); the search sees every write whose
        token is <= ``read_after``."""

    def range_search(self, query: np.ndarray, threshold: float, model_sha256: str) -> list[Hit]:
        """Every item with similarity >= ``threshold`` to one query, best first."""

    def items(self) -> list[Item]: ...

    def get(self, item_id: str) -> Item | None: ...

    def prepare_rebuild(self, model_sha256: str, items: list[Item], embeddings: np.ndarray) -> None:
        """Stage the re-embedded items (Milvus: a new collection) before the switch."""

    def rebuild(self, model_sha256: str, item_ids: list[str], embeddings: np.ndarray) -> None:
        """Switch to ``model_sha256`` with new embeddings for exactly the current items."""

    def snapshot(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Tenant:
    """One tenant of a store: its name, its gallery, the hashes of its API keys and its
    incarnation.

    The incarnation is a random id made when the tenant is created and stored with it:
    a tenant deleted and created again under the same name is another instance, and
    what was bound to the old one (decision ids, server/matching/decisions.py) must not
    reach the new one. Tenants stored before incarnations existed have "".
    """

    name: str
    gallery: TenantGallery
    key_hashes: list[str] = field(default_factory=list)
    incarnation: str = ""


def new_incarnation() -> str:
    """A fresh tenant incarnation (64 random bits, hex)."""
    return secrets.token_hex(8)


class GalleryStore(Protocol):
    """Every tenant and its gallery: created, found, dropped, closed."""

    kind: str
    shared: bool  # several server processes may use it at once
    remote: bool  # searches wait on another service (Milvus), not on this CPU
    # this process reads galleries another process writes (faiss --workers reader):
    # a reload re-reads them (:meth:`reopen`) instead of re-embedding and writing
    follower: bool
    dim: int
    model_sha256: str
    embed: Callable[[list[bytes]], np.ndarray] | None
    # HMAC key of decision ids, shared by every process of the store (None: ids are
    # only known to the process that made them)
    decision_secret: bytes | None

    def load_all(self) -> None: ...

    def create(self, name: str, key_hash: str | None) -> Tenant:
        """A new tenant (TenantError when ``name`` is invalid or taken)."""

    def delete(self, name: str) -> int: ...

    def get(self, name: str) -> Tenant:
        """The tenant called ``name`` (TenantError when there is none)."""

    def names(self) -> list[str]: ...

    def all(self) -> list[Tenant]: ...

    def sizes(self) -> dict[str, int]: ...

    def refresh(self) -> dict[str, list[str]]:
        """Tenant -> key hashes as stored now (other processes' Admin calls included)."""

    def follow(self, name: str) -> Tenant | None:
        """A follower's look at one tenant as stored now (None: no such tenant, or this
        store is not a follower and learns of new tenants at :meth:`refresh`)."""

    def peek(self, name: str) -> Tenant | None:
        """The tenant this process holds under ``name``, without asking the store."""

    def gone(self) -> list[str]:
        """A follower's tenants whose instance it replaced or dropped since the last call,
        each named once ([] where :meth:`refresh` callers compare incarnations instead)."""

    def switch_model(self, model_sha256: str, dim: int, embed) -> None:
        """After every tenant was re-embedded: the model new writes and tenants use."""

    def reopen(self, model_sha256: str, dim: int, embed) -> Callable[[], int]:
        """A follower's reload: every gallery read again under the new model (items
        embedded by another one re-embedded in memory); the function returned switches
        them all at once and returns how many items were re-embedded."""

    def describe_index(self) -> str:
        """What the galleries search with (the ``index`` label of ``tcm_model_info``)."""

    def prepare_thread(self, threads: int) -> None:
        """Per-thread search settings, run once in every thread that searches (faiss:
        its OpenMP thread count, which is per calling thread)."""

    def publish_traffic(self, tenant: str, replica: str, blob: bytes) -> None:
        """Store ``replica``'s cumulative traffic evidence of ``tenant`` (replacing its
        previous row), for every process of the store to read."""

    def read_traffic(self, since: int) -> list[TrafficRow]:
        """Every row published at or after ``since`` (ns), of every tenant and replica, for
        the current model; rows of deleted tenants are gone."""

    def close(self) -> None: ...
