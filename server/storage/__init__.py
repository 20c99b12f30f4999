"""Where galleries live: ``--gallery`` picks a backend (:func:`open_store`).

- ``faiss`` (default): every tenant's gallery in this process, durable on local disk
  (write-ahead log + segments), searched by a faiss index chosen with ``--index``
  (server/storage/faiss/). The fastest on one machine; one process owns a data dir.
- ``milvus://HOST:PORT`` (or ``milvus-lite:PATH.db`` for tests): galleries in Milvus
  (server/storage/milvus.py); the server keeps no gallery state of its own, so several
  processes (``--workers N``) or replicas serve the same tenants.

Both keep the protocol of server/storage/base.py and share the tenant tail statistics
of server/storage/tail_stats.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from server.storage.base import GalleryStore, TailOptions

# --gallery SPEC: the scheme (what precedes the first ':', or the whole spec) picks the
# backend. Backends register themselves when their module is imported; the built-in ones
# are imported only when a spec names them, so the faiss store never needs pymilvus.
GALLERY_SPECS = "use faiss, milvus://HOST:PORT or milvus-lite:PATH.db"
Opener = Callable[..., GalleryStore]
_OPENERS: dict[str, Opener] = {}
_BUILT_IN = {
    "faiss": "server.storage.faiss",
    "milvus": "server.storage.milvus",
    "milvus-lite": "server.storage.milvus",
}


def register(scheme: str, opener: Opener) -> None:
    """Make ``--gallery SCHEME...`` open stores with ``opener(spec, data_dir, dim,
    model_sha256, embed, snapshot_every, index, tail, **options)``; the opener refuses
    a spec of its scheme that it cannot read with :func:`bad_spec`."""
    _OPENERS[scheme] = opener


def scheme_of(spec: str) -> str:
    """``faiss`` for "" and "faiss", else the part before the first ':'."""
    if spec in ("", "faiss"):
        return "faiss"
    head, colon, _ = spec.partition(":")
    return head if colon else spec


def bad_spec(spec: str) -> ValueError:
    return ValueError(f"--gallery {spec!r}: {GALLERY_SPECS}")


def open_store(
    spec: str,
    data_dir,
    dim: int,
    model_sha256: str,
    embed: Callable[[list[bytes]], np.ndarray] | None = None,
    snapshot_every: int = 1000,
    index: str = "flat",
    tail: TailOptions | None = None,
    **options,
) -> GalleryStore:
    """The store ``spec`` names: ``faiss``, ``milvus://HOST:PORT`` or ``milvus-lite:PATH``."""
    scheme = scheme_of(spec)
    if scheme not in _OPENERS and scheme in _BUILT_IN:
        importlib.import_module(_BUILT_IN[scheme])  # registers its schemes
    opener = _OPENERS.get(scheme)
    if opener is None:
        raise bad_spec(spec)
    return opener(spec, data_dir, dim, model_sha256, embed, snapshot_every, index, tail, **options)
