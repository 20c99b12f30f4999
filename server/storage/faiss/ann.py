"""Search indexes over a gallery's item table, chosen by name (``--index``).

The table (server/storage/faiss/item_table.py) is the store: rows, vectors, liveness. An index only
answers "the k most similar live rows" for a batch of queries, so a new index type is
one class registered here, not edits across the gallery. Every index searches a
:class:`~server.storage.faiss.item_table.TableView` without taking the gallery's locks.

- ``flat``: exact inner product (``faiss.knn`` over the table's vector column: BLAS for
  a batch of queries, no copy of the vectors). Removed rows have zeroed vectors, so
  they score 0 and are filtered from the few extra candidates asked for. On a faiss
  build with GPUs, a GPU copy of the vectors answers instead (rebuilt lazily after
  mutations; unverified here: no GPU).
- ``hnsw``: ``IndexHNSWFlat`` (M=32, efSearch=64) in insertion order. HNSW cannot
  delete; removed items are cleared in a bitmap that faiss reads during the graph
  walk (``IDSelectorBitmap``): O(1) per removal and nothing rebuilt per search. The
  graph is written next to the segments and read back on open (the items enrolled
  since are added), so a restart does not rebuild it. Adding to the graph excludes
  searches briefly (a read-write lock); searches run concurrently with each other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

import faiss
import numpy as np

from contracts.files import atomic_write_bytes
from server.storage.faiss.item_table import TableView

log = logging.getLogger(__name__)

HNSW_FILE = "hnsw.faiss"
HNSW_FIDS = "hnsw_fids.npy"


class SearchIndex(Protocol):
    """What the gallery asks of an index. Rows are positions in the view searched."""

    kind: ClassVar[str]

    def search(self, view: TableView, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) of the top-k live rows per query, best first; -1 pads."""

    def added(self, view: TableView, rows: np.ndarray) -> None: ...

    def removed(self, view: TableView, rows: np.ndarray) -> None: ...

    def save(self, directory: Path, force: bool = False) -> None: ...

    def load(self, directory: Path, view: TableView) -> None: ...

    def describe(self) -> str: ...


INDEXES: dict[str, Callable[[int], SearchIndex]] = {}


def register_index(cls):
    """Class decorator: make an index selectable by its ``kind``."""
    INDEXES[cls.kind] = cls
    return cls


def make_index(kind: str, dim: int) -> SearchIndex:
    try:
        return INDEXES[kind](dim)
    except KeyError:
        raise ValueError(f"index must be one of {tuple(INDEXES)}, got {kind!r}") from None


def gpu_count() -> int:
    """GPUs faiss can use (0 for faiss-cpu builds)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def _live_first(sims: np.ndarray, rows: np.ndarray, view: TableView, k: int):
    """Keep the first ``k`` live candidates of each query (order kept); -1 pads."""
    ok = rows >= 0
    ok[ok] = view.alive[rows[ok]]
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(sims, order, 1)
    rows = np.where(np.take_along_axis(ok, order, 1), np.take_along_axis(rows, order, 1), -1)
    return sims, rows, np.take_along_axis(ok, order, 1).sum(axis=1)


@register_index
class FlatIndex:
    """Exact search over the table's vectors; nothing to build, save or load."""

    kind = "flat"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._gpu = gpu_count() > 0
        self._gpu_index = None
        self._gpu_version: tuple | None = None

    def search(self, view: TableView, queries: np.ndarray, k: int):
        n = view.n
        dead = n - view.live
        want = min(n, k + min(dead, 16))
        sims, rows = self._knn(view, queries, want)
        sims, rows, found = _live_first(sims, rows, view, k)
        if dead and want < n and (found < min(k, view.live)).any():
            sims, rows = self._knn(view, queries, min(n, k + dead))  # dead rows scored high
            sims, rows, _ = _live_first(sims, rows, view, k)
        return sims, rows

    def _knn(self, view: TableView, queries: np.ndarray, k: int):
        if self._gpu:  # pragma: no cover - needs a GPU build of faiss
            return self._gpu_knn(view, queries, k)
        return faiss.knn(queries, view.vectors[: view.n], k, metric=faiss.METRIC_INNER_PRODUCT)

    def _gpu_knn(self, view: TableView, queries: np.ndarray, k: int):  # pragma: no cover
        version = (id(view.vectors), view.n, view.live)
        if self._gpu_version != version:
            res = faiss.StandardGpuResources()
            index = faiss.IndexFlatIP(self.dim)
            index.add(view.vectors[: view.n])
            self._gpu_index, self._gpu_res = faiss.index_cpu_to_gpu(res, 0, index), res
            self._gpu_version = version
        return self._gpu_index.search(queries, k)

    def added(self, view: TableView, rows: np.ndarray) -> None:
        pass

    def removed(self, view: TableView, rows: np.ndarray) -> None:
        pass

    def save(self, directory: Path, force: bool = False) -> None:
        pass

    def load(self, directory: Path, view: TableView) -> None:
        pass

    def describe(self) -> str:
        return "flat (faiss.knn inner product)" + (" on GPU" if self._gpu else "")


class ReadWriteLock:
    """Many readers or one writer (writers are not starved: new readers wait for one)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


@register_index
class HnswIndex:
    """HNSW graph over the table in insertion (= stable id) order, with a liveness bitmap."""

    kind = "hnsw"
    M = 32
    EF_SEARCH = 64
    EF_CONSTRUCTION = 40

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._lock = ReadWriteLock()
        self._reset()

    def _reset(self) -> None:
        self.index = faiss.IndexHNSWFlat(self.dim, self.M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efSearch = self.EF_SEARCH
        self.index.hnsw.efConstruction = self.EF_CONSTRUCTION
        self._fids = np.zeros(1024, np.int64)  # graph position -> stable id
        self._bits = np.zeros(128, np.uint8)  # bit p: position p is live
        self._n = 0
        self.dead = 0
        self._saved = 0  # positions covered by the graph file on disk

    # ---------------------------------------------------------------- mutations
    def added(self, view: TableView, rows: np.ndarray) -> None:
        if not len(rows):
            return
        vectors = np.ascontiguousarray(view.vectors[rows])
        fids = view.fids[rows]
        self._lock.acquire_write()
        try:
            self._append(vectors, fids)
        finally:
            self._lock.release_write()

    def _append(self, vectors: np.ndarray, fids: np.ndarray) -> None:
        m, start = len(fids), self._n
        if start + m > len(self._fids):
            cap = max(start + m, 2 * len(self._fids))
            self._fids = np.concatenate([self._fids, np.zeros(cap - len(self._fids), np.int64)])
            bits = np.zeros((cap + 7) // 8, np.uint8)
            bits[: len(self._bits)] = self._bits
            self._bits = bits
        self.index.add(vectors)
        self._fids[start : start + m] = fids
        positions = np.arange(start, start + m)
        np.bitwise_or.at(self._bits, positions >> 3, (1 << (positions & 7)).astype(np.uint8))
        self._n += m

    def removed(self, view: TableView, rows: np.ndarray) -> None:
        self._clear(view.fids[rows])

    def _clear(self, fids: np.ndarray) -> None:
        pos = np.searchsorted(self._fids[: self._n], fids)
        pos = pos[(pos < self._n) & (self._fids[np.minimum(pos, self._n - 1)] == fids)]
        live = (self._bits[pos >> 3] >> (pos & 7)) & 1
        pos = pos[live.astype(bool)]
        np.bitwise_and.at(self._bits, pos >> 3, ~(1 << (pos & 7)).astype(np.uint8))
        self.dead += len(pos)

    # ------------------------------------------------------------------ search
    def search(self, view: TableView, queries: np.ndarray, k: int):
        self._lock.acquire_read()
        try:
            if not self._n:
                return np.full((len(queries), k), -np.inf, np.float32), np.full(
                    (len(queries), k), -1, np.int64
                )
            selector = faiss.IDSelectorBitmap(self._n, faiss.swig_ptr(self._bits))
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.EF_SEARCH, k))
            sims, pos = _search_with_params(self.index, queries, k, params)
            fids = np.where(pos >= 0, self._fids[np.maximum(pos, 0)], -1)
        finally:
            self._lock.release_read()
        rows = view.rows_of(fids)
        ok = (fids >= 0) & (rows < view.n)
        ok[ok] = view.fids[rows[ok]] == fids[ok]  # added after this view was taken
        return sims, np.where(ok, rows, -1)

    # ------------------------------------------------------------- persistence
    def save(self, directory: Path, force: bool = False) -> None:
        """Write the graph when it grew by a tenth since the last write (or ``force``)."""
        if not force and self._n - self._saved < max(10_000, self._saved // 10):
            return
        self._lock.acquire_read()
        try:
            n = self._n
            blob = faiss.serialize_index(self.index)
            fids = self._fids[:n].copy()
        finally:
            self._lock.release_read()
        atomic_write_bytes(directory / HNSW_FILE, blob.tobytes())
        atomic_write_bytes(directory / HNSW_FIDS, _npy(fids))
        self._saved = n

    def load(self, directory: Path, view: TableView) -> None:
        """Read the saved graph, add the rows enrolled since, clear the removed ones;
        without a usable file, build from the table."""
        live_rows = np.flatnonzero(view.alive[: view.n])
        live_fids = view.fids[live_rows]
        try:
            index = faiss.deserialize_index(
                np.frombuffer((directory / HNSW_FILE).read_bytes(), np.uint8)
            )
            fids = np.load(directory / HNSW_FIDS, allow_pickle=False)
            if index.ntotal != len(fids) or index.d != self.dim:
                raise ValueError("graph and its id list disagree")
        except (OSError, ValueError, RuntimeError) as err:
            if (directory / HNSW_FILE).exists():
                log.warning("%s: rebuilding the HNSW graph (%s)", directory, err)
            self._reset()
            self._append(np.ascontiguousarray(view.vectors[live_rows]), live_fids)
            return
        self._reset()
        self.index = index  # already an IndexHNSWFlat (a downcast copy would not own it)
        self.index.hnsw.efSearch = self.EF_SEARCH
        self._fids = np.concatenate([fids, np.zeros(max(1024, len(fids)), np.int64)])
        self._bits = np.full((len(self._fids) + 7) // 8, 0xFF, np.uint8)
        self._n = self._saved = len(fids)
        self._bits[(self._n + 7) // 8 :] = 0
        if self._n % 8:
            self._bits[self._n // 8] &= (1 << (self._n % 8)) - 1
        last = fids[-1] if len(fids) else -1
        self._clear(fids[~np.isin(fids, live_fids, assume_unique=True)])
        newer = live_rows[live_fids > last]
        self._append(np.ascontiguousarray(view.vectors[newer]), view.fids[newer])

    def describe(self) -> str:
        return f"hnsw (IndexHNSWFlat M={self.M}, efSearch={self.EF_SEARCH}, bitmap of removals)"


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _search_with_params(index: faiss.Index, queries: np.ndarray, k: int, params) -> tuple:
    """``index.search(queries, k, params=params)`` through the SWIG call itself.

    ``faiss.contrib.torch_utils`` (imported by pytorch-metric-learning, so by any process
    that also trains or evaluates with it) replaces ``Index.search`` with a wrapper that
    has no ``params`` argument; the C++ entry point is the same in every case.
    """
    x = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(x)
    sims = np.empty((n, k), np.float32)
    pos = np.empty((n, k), np.int64)
    index.search_c(n, faiss.swig_ptr(x), k, faiss.swig_ptr(sims), faiss.swig_ptr(pos), params)
    return sims, pos
