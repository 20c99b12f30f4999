"""The default gallery backend (``--gallery faiss``): every tenant's gallery in this process.

Built from parts that each do one thing: ``tenants`` (the data dir's tenants, the
:class:`~server.storage.base.GalleryStore`), ``gallery`` (one tenant's gallery: log,
segments, table, index), ``wal`` (the write-ahead log), ``segments`` (checkpoints),
``item_table`` (the items as numpy columns), ``ann`` (flat and HNSW indexes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.storage import bad_spec, register
from server.storage.base import TailOptions
from server.storage.faiss.tenants import TenantRegistry


def open_faiss(
    spec: str,
    data_dir: Path,
    dim: int,
    model_sha256: str,
    embed: Callable[[list[bytes]], np.ndarray] | None = None,
    snapshot_every: int = 1000,
    index: str = "flat",
    tail: TailOptions | None = None,
    role: str = "",
    **_options,
) -> TenantRegistry:
    """``--gallery faiss`` (the default): galleries in this process under ``data_dir``;
    ``role`` ``writer`` or ``reader`` when ``--workers`` processes share it."""
    if spec not in ("", "faiss"):
        raise bad_spec(spec)
    return TenantRegistry(data_dir, dim, model_sha256, embed, snapshot_every, index, tail, role)


register("faiss", open_faiss)
