"""One tenant's gallery: a faiss inner-product index plus the items behind it, made durable.

Every mutation is written to the write-ahead log (fsynced) *before* it is applied
and acknowledged; snapshots (written atomically) bound the log's length, and replay
on open rebuilds exactly the acknowledged state. The items keep their source image
bytes so a gallery can be re-embedded when the model changes (DESIGN.md, "Gallery").

Search is exact inner product (``IndexFlatIP`` inside ``IndexIDMap2`` for stable ids
and removal); with L2-normalised embeddings inner product is the cosine similarity.
When faiss sees a GPU, top-k search runs on a GPU copy of the flat index that is
rebuilt after mutations; without one everything stays on the CPU.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from contracts.files import atomic_write_bytes
from scorenorm import ScoreHistogram, TailMap, TailSettings, build_map
from server.ann import HnswTopK
from server.tail_stats import DEFAULT_CAPACITY, Entry, TenantTail, item_hash
from server.wal import WriteAheadLog, read_records

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw")
SNAPSHOT = "snapshot.npz"
WAL = "wal.log"
ONLINE_TAIL = "online_tail.npz"  # the online window of the tail statistics (soft state)
# faiss uses BLAS (much faster for a batch of queries) only from this many queries on;
# the default (20) leaves small micro-batches on the slow path.
faiss.cvar.distance_compute_blas_threshold = 4


class GalleryError(ValueError):
    """The stored gallery cannot be loaded as asked; the message says why."""


class StaleModelError(RuntimeError):
    """The caller's embeddings come from another model than the gallery's (a reload raced)."""


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
    """Top-k neighbours (best first) and the label-free impostor counts of one query.

    ``impostor_total`` counts gallery items whose identity differs from the top-1's
    (identity = label, or the item itself when it has no label); ``impostor_accepted``
    those of them with similarity >= the threshold.
    """

    neighbors: list[Hit]
    impostor_accepted: int
    impostor_total: int

    @property
    def top1(self) -> Hit | None:
        return self.neighbors[0] if self.neighbors else None


def identity(item_id: str, label: str) -> str:
    """Items with the same label are one identity; an unlabelled item is its own."""
    return label if label else "\0" + item_id


def describe_index(kind: str) -> str:
    """What a gallery of ``kind`` searches with (for tcm_model_info)."""
    if kind == "hnsw":
        return "IndexIDMap2(IndexFlatIP) + IndexHNSWFlat top-k"
    return "IndexIDMap2(IndexFlatIP)" + (" + GPU copy" if gpu_count() else "")


def gpu_count() -> int:
    """GPUs faiss can use (0 for faiss-cpu builds)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


class Gallery:
    """Thread-safe; open with :meth:`Gallery.open`. Mutations are durable on return."""

    def __init__(
        self,
        directory: Path,
        dim: int,
        model_sha256: str,
        snapshot_every: int,
        index: str = "flat",
        tail: TailOptions | None = None,
    ) -> None:
        if index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
        self.index = index
        self.directory = directory
        self.dim = dim
        self.model_sha256 = model_sha256
        self.snapshot_every = snapshot_every
        # Two locks, always taken in this order: ``_write`` serialises mutations (and
        # holds across the fsync and snapshot writes); ``_lock`` guards the in-memory
        # index and is held only briefly, so searches never wait for the disk.
        self._write = threading.RLock()
        self._lock = threading.RLock()
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._items: dict[int, Item] = {}
        self._ids: dict[str, int] = {}
        self._identities: Counter[str] = Counter()
        self._codes: dict[str, int] = {}  # identity -> small int, for vectorised counting
        self._code_of = np.zeros(0, np.int64)  # faiss id -> identity code
        self._next_id = 0
        self._lsn = 0
        self._since_snapshot = 0
        self._gpu_index = None
        self._gpu_dirty = True
        self._use_gpu = gpu_count() > 0
        self._wal: WriteAheadLog | None = None
        self._ann = HnswTopK(dim) if index == "hnsw" else None
        self.reembedded = 0  # items re-embedded by open() because the model changed
        self._tail_options = tail or TailOptions()
        self._hash_of = np.zeros(0, np.int64)  # faiss id -> item_hash(item_id)
        self.tail = self._tail_options.new(dim)
        self._map_cache: tuple[tuple, TailMap] | None = None

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        directory: Path,
        dim: int,
        model_sha256: str,
        embed=None,
        snapshot_every: int = 1000,
        index: str = "flat",
        tail: TailOptions | None = None,
    ) -> Gallery:
        """Load snapshot + log. Items embedded by another model are re-embedded with
        ``embed(list_of_image_bytes) -> (n, dim) float32``; without it that is an error.
        ``index``: "flat" (exact) or "hnsw" (approximate top-k, see server/ann.py).
        ``tail``: the sample behind the tenant's normalisation statistics."""
        gallery = cls(directory, dim, model_sha256, snapshot_every, index, tail)
        directory.mkdir(parents=True, exist_ok=True)
        state = _load_snapshot(directory / SNAPSHOT)
        entries: dict[str, tuple[int, Item, np.ndarray, str]] = state["entries"]
        gallery._lsn = state["lsn"]
        gallery._next_id = state["next_id"]
        replayed = 0
        for payload in read_records(directory / WAL):
            record, vector, image = _decode_record(payload, dim)
            if record["lsn"] <= gallery._lsn:
                continue  # already in the snapshot (crash between snapshot and log reset)
            gallery._lsn = record["lsn"]
            replayed += 1
            if record["op"] == "add":
                fid = record["id"]
                gallery._next_id = max(gallery._next_id, fid + 1)
                item = Item(record["item_id"], record["label"], image)
                entries[item.item_id] = (fid, item, vector, record["model"])
            else:
                for item_id in record["item_ids"]:
                    entries.pop(item_id, None)
        stale = [e for e in entries.values() if e[3] != model_sha256]
        if stale:
            if embed is None:
                raise GalleryError(
                    f"{directory}: {len(stale)} items were embedded by another model; "
                    "open with an embedder to re-embed them"
                )
            vectors = embed([e[1].image for e in stale])
            for (fid, item, _, _), vector in zip(stale, vectors, strict=True):
                entries[item.item_id] = (fid, item, vector, model_sha256)
            log.info("%s: re-embedded %d items for model %s", directory, len(stale), model_sha256)
        gallery.reembedded = len(stale)
        gallery._apply_add([(fid, item, vec) for fid, item, vec, _ in entries.values()])
        gallery._restore_online_tail()
        gallery._wal = WriteAheadLog(directory / WAL)
        gallery._since_snapshot = replayed
        if stale or replayed >= snapshot_every:
            gallery.snapshot()
        log.info("%s: %d items (%d log records replayed)", directory, len(entries), replayed)
        return gallery

    # --------------------------------------------------------------- mutations
    def add(
        self,
        items: list[Item],
        embeddings: np.ndarray,
        model_sha256: str,
        replace: bool = False,
    ) -> list[str | None]:
        """Enrol ``items``; per item ``None`` (added) or the gRPC status name of its failure.

        Durable before it returns: the log is fsynced, then the index changes.
        """
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(items), self.dim):
            raise ValueError(f"embeddings shape {embeddings.shape} != ({len(items)}, {self.dim})")
        with self._write:
            self._check_model(model_sha256)
            outcome: list[str | None] = []
            accepted: list[tuple[int, Item, np.ndarray]] = []
            seen: set[str] = set()
            for item, vector in zip(items, embeddings, strict=True):
                if item.item_id in seen:
                    outcome.append("INVALID_ARGUMENT")
                elif item.item_id in self._ids and not replace:
                    outcome.append("ALREADY_EXISTS")
                else:
                    outcome.append(None)
                    accepted.append((self._next_id + len(accepted), item, vector))
                seen.add(item.item_id)
            if not accepted:
                return outcome
            records = []
            for fid, item, vector in accepted:
                self._lsn += 1
                head = {"op": "add", "lsn": self._lsn, "id": fid, "item_id": item.item_id}
                head |= {"label": item.label, "model": model_sha256, "dim": self.dim}
                records.append(_encode_record(head, vector, item.image))
            self._wal_append(records)
            self._next_id += len(accepted)
            replaced = [self._ids[i.item_id] for _, i, _ in accepted if i.item_id in self._ids]
            with self._lock:
                self._apply_remove(replaced)
                self._apply_add(accepted)
            self._after_write(len(records))
            return outcome

    def remove(self, item_ids: list[str]) -> tuple[list[str], list[str]]:
        """Remove by id; returns (removed, not_found). Durable before it returns."""
        with self._write:
            found = list(dict.fromkeys(i for i in item_ids if i in self._ids))
            missing = [i for i in item_ids if i not in self._ids]
            if found:
                self._lsn += 1
                head = {"op": "remove", "lsn": self._lsn, "item_ids": found}
                self._wal_append([_encode_record(head, None, b"")])
                with self._lock:
                    self._apply_remove([self._ids[i] for i in found])
                self._after_write(1)
            return found, missing

    def rebuild(self, model_sha256: str, item_ids: list[str], embeddings: np.ndarray) -> None:
        """Switch to ``model_sha256`` with new embeddings for exactly the current items.

        The caller keeps mutations out meanwhile (the server's reload lock); the
        snapshot that follows makes the switch durable.
        """
        with self._write, self._lock:
            if sorted(item_ids) != sorted(self._ids):
                raise RuntimeError("gallery changed during re-embedding; retry the reload")
            entries = [
                (self._ids[i], self._items[self._ids[i]], v)
                for i, v in zip(item_ids, embeddings, strict=True)
            ]
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            self._items.clear()
            self._ids.clear()
            self._identities.clear()
            self.model_sha256 = model_sha256
            self._ann = HnswTopK(self.dim) if self.index == "hnsw" else None
            self.tail = self._tail_options.new(self.dim)  # the new model's scores, from scratch
            self._apply_add(entries)

    # ------------------------------------------------------------------ search
    def search(
        self, queries: np.ndarray, k: int, threshold: float, model_sha256: str
    ) -> list[SearchResult]:
        """Top-``k`` neighbours and label-free impostor counts at ``threshold``, per query."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            self._check_model(model_sha256)
            n = len(self._items)
            if n == 0:
                return [SearchResult([], 0, 0) for _ in range(len(queries))]
            k = max(1, min(k, n))
            sims, ids = self._topk(queries, k)
            if (ids[:, 0] < 0).any():  # an approximate search came back empty: be exact
                sims, ids = self._index.search(queries, k)
            top_code = self._code_of[ids[:, 0]]
            if self._ann is not None:
                accepted, totals = self._ann.label_free(queries, top_code, self._code_of, threshold)
            else:
                accepted, totals = self._exact_counts(queries, top_code, threshold), None
            results = []
            for q in range(len(queries)):
                hits = [
                    Hit(self._items[int(i)].item_id, self._items[int(i)].label, float(s))
                    for s, i in zip(sims[q], ids[q], strict=True)
                    if i >= 0
                ]
                if totals is None:
                    top = self._items[int(ids[q, 0])]
                    total = n - self._identities[identity(top.item_id, top.label)]
                else:
                    total = int(totals[q])
                results.append(SearchResult(hits, int(accepted[q]), total))
            return results

    def _exact_counts(self, queries: np.ndarray, top_code: np.ndarray, threshold: float):
        """Per query: gallery items of another identity than its top-1 with s >= threshold."""
        radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
        lims, rsims, rids = self._index.range_search(queries, radius)
        owner = np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64)))
        other = (rsims >= threshold) & (self._code_of[rids] != top_code[owner])
        return np.bincount(owner[other], minlength=len(queries))

    def _topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._ann is not None:
            return self._ann.search(queries, k)
        if not self._use_gpu:
            return self._index.search(queries, k)
        if self._gpu_dirty:  # pragma: no cover - needs a GPU build of faiss
            res = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(res, 0, self._index.index)
            self._gpu_res = res
            self._gpu_dirty = False
        sims, pos = self._gpu_index.search(queries, k)  # pragma: no cover
        id_map = faiss.vector_to_array(self._index.id_map)  # pragma: no cover
        return sims, np.where(pos >= 0, id_map[np.maximum(pos, 0)], -1)  # pragma: no cover

    # ------------------------------------------------------------------- state
    @property
    def size(self) -> int:
        return len(self._items)

    @property
    def index_kind(self) -> str:
        return describe_index(self.index)

    def items(self) -> list[Item]:
        """The current items (insertion order), e.g. to re-embed them."""
        with self._lock:
            return [self._items[fid] for fid in faiss.vector_to_array(self._index.id_map)]

    def get(self, item_id: str) -> Item | None:
        with self._lock:
            fid = self._ids.get(item_id)
            return None if fid is None else self._items[fid]

    def snapshot(self) -> None:
        """Write everything to an atomic snapshot, then empty the log.

        The state is copied under the index lock; writing and fsync hold only the write
        lock, so searches go on meanwhile.
        """
        with self._write:
            with self._lock:
                ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
                codes = faiss.vector_to_array(faiss.downcast_index(self._index.index).codes)
                items = [self._items[int(fid)] for fid in ids]
                meta = {
                    "lsn": self._lsn,
                    "next_id": self._next_id,
                    "dim": self.dim,
                    "model": self.model_sha256,
                    "items": [[i.item_id, i.label] for i in items],
                }
            vectors = codes.view(np.float32).reshape(-1, self.dim)
            blob = b"".join(i.image for i in items)
            offsets = np.cumsum([0] + [len(i.image) for i in items]).astype(np.int64)
            buffer = io.BytesIO()
            np.savez(
                buffer,
                ids=ids,
                vectors=vectors,
                offsets=offsets,
                blob=np.frombuffer(blob, np.uint8),
                meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
            )
            atomic_write_bytes(self.directory / SNAPSHOT, buffer.getvalue())
            self._save_online_tail()
            if self._wal is not None:
                self._wal.reset()
            self._since_snapshot = 0

    def close(self) -> None:
        """Snapshot if the log holds anything (faster next start), then close the log."""
        with self._write:
            if self._wal is not None:
                if self._wal.size():
                    self._try_snapshot()
                self._wal.close()
                self._wal = None

    # ---------------------------------------------------------------- internal
    def _check_model(self, model_sha256: str) -> None:
        if model_sha256 != self.model_sha256:
            raise StaleModelError(f"gallery is on model {self.model_sha256}, not {model_sha256}")

    def _wal_append(self, records: list[bytes]) -> None:
        if self._wal is None:
            raise RuntimeError(f"gallery {self.directory} is closed")
        self._wal.append(records)

    def _after_write(self, records: int) -> None:
        self._gpu_dirty = True
        self._since_snapshot += records
        if self._since_snapshot >= self.snapshot_every:
            self._try_snapshot()

    def _try_snapshot(self) -> None:
        """A snapshot only shortens replay: when it fails (disk full) the log still holds
        everything, so the acknowledged write stands and the next write tries again."""
        try:
            self.snapshot()
        except OSError as err:
            log.warning("%s: snapshot failed, the log keeps everything: %s", self.directory, err)

    def _apply_add(self, entries: list[tuple[int, Item, np.ndarray]]) -> None:
        if not entries:
            return
        vectors = np.stack([e[2] for e in entries]).astype(np.float32)
        ids = np.asarray([e[0] for e in entries], np.int64)
        self._index.add_with_ids(vectors, ids)
        if self._ann is not None:
            self._ann.add(vectors, ids)
        if ids.max() >= len(self._code_of):
            grown = np.full(max(2 * len(self._code_of), int(ids.max()) + 1, 64), -1, np.int64)
            grown[: len(self._code_of)] = self._code_of
            self._code_of = grown
        if ids.max() >= len(self._hash_of):
            grown = np.zeros(len(self._code_of), np.int64)
            grown[: len(self._hash_of)] = self._hash_of
            self._hash_of = grown
        tail_entries = []
        for fid, item, vector in entries:
            key = identity(item.item_id, item.label)
            self._code_of[fid] = self._codes.setdefault(key, len(self._codes))
            self._hash_of[fid] = item_hash(item.item_id)
            self._items[fid] = item
            self._ids[item.item_id] = fid
            self._identities[identity(item.item_id, item.label)] += 1
            tail_entries.append(
                Entry(fid, int(self._hash_of[fid]), vector, int(self._code_of[fid]))
            )
        self.tail.add(tail_entries)
        self._gpu_dirty = True

    def _apply_remove(self, fids: list[int]) -> None:
        if not fids:
            return
        self._index.remove_ids(np.asarray(fids, np.int64))
        left = self.tail.remove(fids)
        if self._ann is not None:
            self._ann.remove(fids)
            if self._ann.needs_rebuild():
                codes = faiss.vector_to_array(faiss.downcast_index(self._index.index).codes)
                self._ann.rebuild(
                    codes.view(np.float32).reshape(-1, self.dim),
                    faiss.vector_to_array(self._index.id_map).astype(np.int64),
                )
        for fid in fids:
            item = self._items.pop(fid)
            del self._ids[item.item_id]
            key = identity(item.item_id, item.label)
            self._identities[key] -= 1
            if not self._identities[key]:
                del self._identities[key]
        if left:
            self._refill_tail(left)
        self._gpu_dirty = True

    def _refill_tail(self, n: int) -> None:
        """Members were removed: the ``n`` non-members with the smallest hashes join, so
        the sample stays the bottom-k of the current items (O(N) numpy, and only when a
        removed item was a member)."""
        fids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        outside = fids[~np.isin(fids, self.tail.member_fids())]
        if not len(outside):
            return
        pick = outside[np.argsort(self._hash_of[outside], kind="stable")[:n]]
        self.tail.refill(
            [
                Entry(
                    int(f),
                    int(self._hash_of[f]),
                    self._index.reconstruct(int(f)),
                    int(self._code_of[f]),
                )
                for f in pick
            ]
        )

    # ------------------------------------------------------------- normalisation
    def tail_map(self, global_tail: ScoreHistogram, settings: TailSettings) -> TailMap:
        """This tenant's tenant-tail map, rebuilt only when its statistics changed."""
        with self._lock:
            key = (self.tail.version, id(global_tail), settings)
            if self._map_cache is None or self._map_cache[0] != key:
                self._map_cache = (key, build_map(self.tail.histogram(), global_tail, settings))
            return self._map_cache[1]

    def observe(self, queries: np.ndarray, matched_item_ids: list[str | None]) -> None:
        """Online tail samples of served queries (see server/tail_stats.py)."""
        with self._lock:
            codes = [
                None if i is None or i not in self._ids else int(self._code_of[self._ids[i]])
                for i in matched_item_ids
            ]
            self.tail.observe(np.asarray(queries, np.float32), codes)

    def _save_online_tail(self) -> None:
        state = self.tail.online_state()
        if not state:
            return
        buffer = io.BytesIO()
        np.savez(buffer, model=np.frombuffer(self.model_sha256.encode(), np.uint8), **state)
        atomic_write_bytes(self.directory / ONLINE_TAIL, buffer.getvalue())

    def _restore_online_tail(self) -> None:
        path = self.directory / ONLINE_TAIL
        if not path.exists():
            return
        try:
            with np.load(path, allow_pickle=False) as data:
                if data["model"].tobytes().decode() != self.model_sha256:
                    return  # another model's scores: start the window afresh
                self.tail.restore_online({k: data[k] for k in data.files if k != "model"})
        except Exception as err:  # soft state: a damaged file only costs the window
            log.warning("%s: ignoring unreadable online tail (%s)", path, err)


@dataclass(frozen=True)
class TailOptions:
    """How a gallery samples itself for its tenant's normalisation statistics."""

    capacity: int = DEFAULT_CAPACITY
    online_weight: float = 0.5

    def new(self, dim: int) -> TenantTail:
        return TenantTail(dim, self.capacity, self.online_weight)


# ------------------------------------------------------------------ encoding
_LEN = np.dtype("<u4")


def _encode_record(head: dict, vector: np.ndarray | None, image: bytes) -> bytes:
    """``<json length u32><json><float32 vector><image bytes>``."""
    text = json.dumps(head, separators=(",", ":")).encode()
    vec = b"" if vector is None else np.asarray(vector, "<f4").tobytes()
    return np.asarray([len(text)], _LEN).tobytes() + text + vec + image


def _decode_record(payload: bytes, dim: int) -> tuple[dict, np.ndarray | None, bytes]:
    size = int(np.frombuffer(payload[:4], _LEN)[0])
    head = json.loads(payload[4 : 4 + size])
    rest = payload[4 + size :]
    if head["op"] != "add":
        return head, None, b""
    width = 4 * head.get("dim", dim)
    return head, np.frombuffer(rest[:width], "<f4").astype(np.float32), bytes(rest[width:])


def _load_snapshot(path: Path) -> dict:
    """Entries of a snapshot; vectors of another dimension come with another model's sha
    and are re-embedded by :meth:`Gallery.open`."""
    if not path.exists():
        return {"entries": {}, "lsn": 0, "next_id": 0}
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            ids, vectors, offsets = data["ids"], data["vectors"], data["offsets"]
            blob = data["blob"].tobytes()
    except Exception as err:  # zip, npy or JSON damage: snapshots are atomic, so it is the disk
        raise GalleryError(
            f"{path}: unreadable gallery snapshot ({type(err).__name__}: {err}); restore it "
            "from a backup or move the tenant's folder away to start it empty"
        ) from err
    entries = {}
    for n, (item_id, label) in enumerate(meta["items"]):
        image = blob[offsets[n] : offsets[n + 1]]
        entries[item_id] = (int(ids[n]), Item(item_id, label, image), vectors[n], meta["model"])
    return {"entries": entries, "lsn": meta["lsn"], "next_id": meta["next_id"]}
