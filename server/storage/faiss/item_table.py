"""The items of one gallery in RAM, as columns: what a million items cost is a few arrays.

A gallery used to keep one Python object per item (id, label, image bytes): about
1.5 KB each. Here every item is a row of numpy columns (vector, stable id, id hash,
identity code, where its image lies on disk, its id's UTF-8 bytes), so the memory
beyond the vectors is a few dozen bytes per item, and images stay on disk
(server/storage/faiss/segments.py) until a re-embedding needs them.

Readers never take a lock. Rows are only ever appended into spare capacity and
published as a new immutable :class:`TableView` (the count grows); a growth or a
compaction writes fresh arrays and publishes a view of them. A search holds the view
it started with, so it sees a consistent table whatever writers do meanwhile. A
removed row is marked dead and its vector zeroed in place (a search that races the
removal may still return it: the removal had not completed when the search began).
Writers are serialised by the gallery's write lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.storage.tail_stats import item_hash

# Identity codes: a label's code is its index in the label table; an item without a
# label is its own identity, coded above every label code (all codes stay >= 0).
UNLABELLED = 1 << 40
PENDING = -1  # image segment of a row whose image is still only in the write-ahead log
_MERGE_RECENT = 1 << 16  # id-index entries kept in a dict before merging into the arrays
_COLUMNS = ("vectors", "fids", "alive", "codes", "hashes", "img_seg", "img_off", "img_len")


@dataclass(frozen=True)
class TableView:
    """An immutable view of the first ``n`` rows; safe to read without a lock."""

    n: int
    vectors: np.ndarray  # (capacity, dim) float32; rows >= n are not part of the view
    fids: np.ndarray  # stable ids, strictly increasing with the row
    alive: np.ndarray  # False for removed rows (their vectors are zeroed)
    codes: np.ndarray  # identity codes
    live: int  # alive rows among the first n
    id_bytes: np.ndarray  # UTF-8 item ids, concatenated
    id_off: np.ndarray

    def item_id(self, row: int) -> str:
        return self.id_bytes[self.id_off[row] : self.id_off[row + 1]].tobytes().decode()

    def rows_of(self, fids: np.ndarray) -> np.ndarray:
        """Rows of ``fids`` (which must be in the view)."""
        return np.searchsorted(self.fids[: self.n], fids)


class IdIndex:
    """item id -> stable id, by the 63-bit hash of the id: sorted arrays plus a small dict.

    16 bytes per item instead of a Python dict's ~100: entries go to a dict first and
    are merged into the sorted arrays every 65,536 of them (amortised O(log N) per
    item). Stale entries (removed items) are left in place and filtered by the caller,
    which verifies every candidate against the table; :meth:`rebuild` drops them.
    """

    def __init__(self) -> None:
        self._keys = np.zeros(0, np.int64)
        self._vals = np.zeros(0, np.int64)
        self._recent: dict[int, list[int]] = {}

    def add(self, key: int, fid: int) -> None:
        self._recent.setdefault(key, []).append(fid)
        if len(self._recent) >= _MERGE_RECENT:
            self._merge()

    def candidates(self, key: int) -> list[int]:
        lo, hi = np.searchsorted(self._keys, [key, key + 1])
        found = self._vals[lo:hi].tolist()
        return found + self._recent.get(key, [])

    def rebuild(self, keys: np.ndarray, fids: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self._keys, self._vals = keys[order].copy(), fids[order].copy()
        self._recent = {}

    def _merge(self) -> None:
        keys = np.fromiter((k for k, v in self._recent.items() for _ in v), np.int64, count=-1)
        vals = np.fromiter((f for v in self._recent.values() for f in v), np.int64, count=-1)
        keys = np.concatenate([self._keys, keys])
        vals = np.concatenate([self._vals, vals])
        order = np.argsort(keys, kind="stable")
        self._keys, self._vals, self._recent = keys[order], vals[order], {}

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._vals.nbytes


class ItemTable:
    """Columns of a gallery's items; see the module docstring for the concurrency rules."""

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = dim
        self._cap = max(16, capacity)
        self._n = 0
        self._live = 0
        self.vectors = np.zeros((self._cap, dim), np.float32)
        self.fids = np.zeros(self._cap, np.int64)
        self.alive = np.zeros(self._cap, bool)
        self.codes = np.zeros(self._cap, np.int64)
        self.hashes = np.zeros(self._cap, np.int64)
        self.img_seg = np.zeros(self._cap, np.int32)
        self.img_off = np.zeros(self._cap, np.int64)
        self.img_len = np.zeros(self._cap, np.int32)
        self.id_off = np.zeros(self._cap + 1, np.int64)
        self._id_bytes = np.zeros(1 << 12, np.uint8)
        self.labels: list[str] = []
        self._label_code: dict[str, int] = {}
        self._ids = IdIndex()
        self.view = self._publish()

    # ------------------------------------------------------------------ reads
    @property
    def size(self) -> int:
        return self._live

    def item_id(self, row: int) -> str:
        return self._id_bytes[self.id_off[row] : self.id_off[row + 1]].tobytes().decode()

    def label(self, row: int) -> str:
        code = int(self.codes[row])
        return "" if code >= UNLABELLED else self.labels[code]

    def find(self, item_id: str) -> int | None:
        """The row of a live item, or None."""
        view = self.view
        for fid in self._ids.candidates(item_hash(item_id)):
            row = int(np.searchsorted(view.fids[: view.n], fid))
            found = row < view.n and view.fids[row] == fid and view.alive[row]
            if found and self.item_id(row) == item_id:
                return row
        return None

    def row_of_fid(self, fid: int) -> int | None:
        view = self.view
        row = int(np.searchsorted(view.fids[: view.n], fid))
        return row if row < view.n and view.fids[row] == fid else None

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.alive[: self._n])

    def code_of(self, item_id: str, label: str, fid: int) -> int:
        if not label:
            return UNLABELLED + fid
        code = self._label_code.get(label)
        if code is None:
            code = self._label_code[label] = len(self.labels)
            self.labels.append(label)
        return code

    # ----------------------------------------------------------------- writes
    def append(
        self,
        fids: np.ndarray,
        item_ids: list[str],
        labels: list[str],
        vectors: np.ndarray,
        img_seg: np.ndarray | None = None,
        img_off: np.ndarray | None = None,
        img_len: np.ndarray | None = None,
    ) -> np.ndarray:
        """Append rows (fids must exceed every fid present); returns their rows."""
        m = len(fids)
        if m == 0:
            return np.zeros(0, np.int64)
        if self._n and fids[0] <= self.fids[self._n - 1]:
            raise ValueError("fids must grow with every append")
        self._reserve(self._n + m)
        rows = np.arange(self._n, self._n + m)
        encoded = [i.encode() for i in item_ids]
        lengths = np.fromiter((len(b) for b in encoded), np.int64, m)
        start = self.id_off[self._n]
        need = int(start + lengths.sum())
        if need > len(self._id_bytes):
            grown = np.zeros(max(need, 2 * len(self._id_bytes)), np.uint8)
            grown[:start] = self._id_bytes[:start]
            self._id_bytes = grown
        self._id_bytes[start:need] = np.frombuffer(b"".join(encoded), np.uint8)
        self.id_off[self._n + 1 : self._n + m + 1] = start + np.cumsum(lengths)
        self.vectors[rows] = vectors
        self.fids[rows] = fids
        self.alive[rows] = True
        self.codes[rows] = [
            self.code_of(i, lab, int(f)) for i, lab, f in zip(item_ids, labels, fids, strict=True)
        ]
        hashes = [item_hash(i) for i in item_ids]
        self.hashes[rows] = hashes
        self.img_seg[rows] = PENDING if img_seg is None else img_seg
        self.img_off[rows] = 0 if img_off is None else img_off
        self.img_len[rows] = 0 if img_len is None else img_len
        for h, f in zip(hashes, fids.tolist(), strict=True):
            self._ids.add(h, f)
        self._n += m
        self._live += m
        self.view = self._publish()
        return rows

    def bulk_load(
        self,
        fids: np.ndarray,
        vectors: np.ndarray,
        hashes: np.ndarray,
        id_bytes: np.ndarray,
        id_off: np.ndarray,
        labels: list[str],
        label_idx: np.ndarray,
        img_seg: np.ndarray,
        img_off: np.ndarray,
        img_len: np.ndarray,
    ) -> None:
        """Replace an empty table by these rows (opening a gallery: no per-item Python)."""
        if self._n:
            raise RuntimeError("bulk_load needs an empty table")
        m = len(fids)
        self._reserve(m + m // 8)
        remap = np.array([self.code_of("", lab, 0) for lab in labels] + [-1], np.int64)
        codes = remap[label_idx]
        self.codes[:m] = np.where(label_idx < 0, UNLABELLED + fids, codes)
        self.vectors[:m], self.fids[:m], self.hashes[:m] = vectors, fids, hashes
        self.alive[:m] = True
        self.img_seg[:m], self.img_off[:m], self.img_len[:m] = img_seg, img_off, img_len
        spare = np.zeros(max(4096, len(id_bytes) // 8), np.uint8)
        self._id_bytes = np.concatenate([id_bytes, spare])
        self.id_off[: m + 1] = id_off
        self._ids.rebuild(hashes, fids)
        self._n = self._live = m
        self.view = self._publish()

    def kill(self, rows: np.ndarray) -> None:
        """Mark rows removed; zeroed vectors keep them out of the top of any search."""
        rows = rows[self.alive[rows]]
        self.alive[rows] = False
        self.vectors[rows] = 0.0
        self._live -= len(rows)
        self.view = self._publish()

    def place_images(self, rows: np.ndarray, seg: int, off: np.ndarray, length: np.ndarray):
        self.img_seg[rows], self.img_off[rows], self.img_len[rows] = seg, off, length

    def dead_share(self) -> float:
        return 1 - self._live / self._n if self._n else 0.0

    def compact(self) -> np.ndarray:
        """Drop dead rows into fresh arrays (readers keep the old ones); returns the
        surviving old rows, in order."""
        keep = self.live_rows()
        self._cap = max(16, len(keep) + len(keep) // 8)
        ids = [self._id_bytes[self.id_off[r] : self.id_off[r + 1]] for r in keep]
        lengths = np.fromiter((len(b) for b in ids), np.int64, len(keep))
        id_off = np.zeros(self._cap + 1, np.int64)
        id_off[1 : len(keep) + 1] = np.cumsum(lengths)
        id_bytes = np.zeros(max(1 << 12, 2 * int(id_off[len(keep)])), np.uint8)
        if len(keep):
            id_bytes[: id_off[len(keep)]] = np.concatenate(ids)
        for name in _COLUMNS:
            old = getattr(self, name)
            new = np.zeros((self._cap, *old.shape[1:]), old.dtype)
            new[: len(keep)] = old[keep]
            setattr(self, name, new)
        self.id_off, self._id_bytes = id_off, id_bytes
        self._n = self._live = len(keep)
        self._ids.rebuild(self.hashes[: self._n], self.fids[: self._n])
        self.view = self._publish()
        return keep

    def nbytes(self, include_vectors: bool = False) -> int:
        """Bytes held by the columns (what a million items cost)."""
        names = ("fids", "alive", "codes", "hashes", "img_seg", "img_off", "img_len", "id_off")
        total = sum(getattr(self, n).nbytes for n in names) + self._id_bytes.nbytes
        total += self._ids.nbytes
        return total + (self.vectors.nbytes if include_vectors else 0)

    # --------------------------------------------------------------- internal
    def _reserve(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(need, self._cap + max(self._cap // 8, 4096))  # spare room <= 1/8
        for name in _COLUMNS:
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)
        id_off = np.zeros(cap + 1, np.int64)
        id_off[: self._n + 1] = self.id_off[: self._n + 1]
        self.id_off = id_off
        self._cap = cap

    def _publish(self) -> TableView:
        return TableView(
            self._n,
            self.vectors,
            self.fids,
            self.alive,
            self.codes,
            self._live,
            self._id_bytes,
            self.id_off,
        )
