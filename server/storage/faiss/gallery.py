"""One tenant's gallery in this process: a store (log + segments), a table, an index.

The faiss backend of server/storage/base.py, built from parts that each do one thing
(the modules next to this one):

- **durability**: every mutation is appended to the write-ahead log (``wal.py``) and
  fsynced *before* it is applied and acknowledged. Every ``snapshot_every`` records a
  checkpoint writes what changed since the last one as a segment (``segments.py``)
  and empties the log; compaction keeps the segment count bounded. Opening reads the
  segments, then replays the log records newer than them, which rebuilds exactly the
  acknowledged state;
- **the table** (``item_table.py``): the items as numpy columns in RAM, images on
  disk; searches read an immutable view of it without a lock;
- **the index** (``ann.py``, ``--index``): flat exact search or HNSW, over the table;
- **the tail statistics** (server/storage/tail_stats.py): the bottom-k-by-id-hash
  sample behind score normalisation and the label-free counts, updated as items come
  and go.

Items keep their source image bytes (on disk) so a gallery can be re-embedded when the
model changes (DESIGN.md, "Gallery"). With L2-normalised embeddings inner product is
the cosine similarity.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.storage.base import (
    GalleryError,
    Hit,
    Item,
    SearchResult,
    StaleModelError,
    TailOptions,
    identity,
)
from server.storage.faiss.ann import INDEXES, FlatIndex, SearchIndex, gpu_count, make_index
from server.storage.faiss.item_table import PENDING, UNLABELLED, ItemTable
from server.storage.faiss.segments import Rows, SegmentError, SegmentStore
from server.storage.faiss.wal import WriteAheadLog, read_records
from server.storage.tail_stats import Entry, TailSnapshot, TenantTail, item_hash

log = logging.getLogger(__name__)

__all__ = [
    "INDEX_KINDS",
    "Gallery",
    "GalleryError",
    "Hit",
    "Item",
    "SearchResult",
    "StaleModelError",
    "TailOptions",
    "describe_index",
    "gpu_count",
    "identity",
]

INDEX_KINDS = tuple(INDEXES)
LEGACY_SNAPSHOT = "snapshot.npz"  # the whole-gallery format before segments
WAL = "wal.log"
ONLINE_TAIL = "online_tail.npz"  # older versions' online tail window; removed on open
COMPACT_DEAD_SHARE = 0.25  # the RAM table drops removed rows beyond this share
TOKEN_SHIFT = 40  # a write token: token tag << 40 | log sequence number
TOKEN_TAGS = 1 << 24  # token tags in use: 1 .. 2**24 - 1 (0: a tenant from before tags)


def describe_index(kind: str) -> str:
    """What a gallery of ``kind`` searches with (for tcm_model_info)."""
    return make_index(kind, 4).describe()


@dataclass
class _Generation:
    """What one model's gallery is made of; a reload swaps the whole generation at once,
    so a search never mixes a table of one model with the index of another."""

    model: str
    table: ItemTable
    index: SearchIndex
    tail: TenantTail
    pending: dict[int, bytes] = field(default_factory=dict)  # fid -> image, not checkpointed
    tombstones: list[int] = field(default_factory=list)  # removed fids of segments


class Gallery:
    """Thread-safe; open with :meth:`Gallery.open`. Mutations are durable on return.

    ``writes``: this process owns the directory (writes the log, segments, index files).
    A :class:`~server.storage.faiss.follower.FollowingGallery` reads another process's
    instead and never touches the disk.

    Locks: ``_write`` serialises mutations and checkpoints (held across fsyncs);
    ``_lock`` guards the in-memory state while a mutation applies and while the tail
    statistics change (held briefly). A search takes neither across the faiss call.
    """

    def __init__(
        self,
        directory: Path,
        dim: int,
        model_sha256: str,
        snapshot_every: int,
        index: str = "flat",
        tail: TailOptions | None = None,
    ) -> None:
        if index not in INDEXES:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
        self.index = index
        self.directory = directory
        self.dim = dim
        self.snapshot_every = snapshot_every
        self._write = threading.RLock()
        self._lock = threading.RLock()
        self._tail_options = tail or TailOptions()
        self._gen = self._new_generation(model_sha256, dim)
        self._store = SegmentStore(directory, snapshot_every)
        self._wal: WriteAheadLog | None = None
        self._lsn = 0
        self._next_id = 0
        self._since_snapshot = 0
        self._rewrite = False  # the next checkpoint writes a whole new generation
        self.reembedded = 0  # items re-embedded by open() because the model changed

    writes = True
    token_tag = 0  # the tenant instance's tag, greater for a newer one; set by the registry

    @property
    def write_token(self) -> int:
        """The log sequence number of the last acknowledged write, tagged with the tenant
        instance: a follower that has applied the log up to it has seen that write, and
        one that follows another instance of the tenant knows (server/storage/faiss/
        follower.py)."""
        return (self.token_tag << TOKEN_SHIFT) | self._lsn

    def _new_generation(self, model: str, dim: int) -> _Generation:
        return _Generation(
            model, ItemTable(dim), make_index(self.index, dim), self._tail_options.new(dim)
        )

    # ------------------------------------------------------------------ state
    @property
    def model_sha256(self) -> str:
        return self._gen.model

    @property
    def tail(self) -> TenantTail:
        return self._gen.tail

    @property
    def size(self) -> int:
        return self._gen.table.size

    @property
    def index_kind(self) -> str:
        return self._gen.index.describe()

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
        """Load segments + log. Items embedded by another model are re-embedded with
        ``embed(list_of_image_bytes) -> (n, dim) float32``; without it that is an error.
        ``index``: a name of server/storage/faiss/ann.py (``flat``, ``hnsw``).
        ``tail``: the sample behind the tenant's normalisation statistics."""
        gallery = cls(directory, dim, model_sha256, snapshot_every, index, tail)
        try:
            return gallery._load(embed, index)
        except BaseException:
            gallery._abandon()
            raise

    def _load(self, embed, index: str) -> Gallery:
        """The body of :meth:`open`: segments, then the log, then the index."""
        directory, dim, model_sha256 = self.directory, self.dim, self.model_sha256
        if self.writes:
            directory.mkdir(parents=True, exist_ok=True)
        try:
            rows, images, stored_model = self._load_rows()
        except SegmentError as err:
            raise GalleryError(str(err)) from err
        records = self._log_records()
        stale = stored_model != model_sha256 and len(rows) > 0
        stale_records = any(
            r["op"] == "add" and r["model"] != model_sha256
            for r in (_decode_record(p, dim)[0] for p in records)
        )
        if (stale or stale_records) and embed is None:
            raise GalleryError(
                f"{directory}: items were embedded by another model; "
                "open with an embedder to re-embed them"
            )
        if stale:
            if images is None:
                images = self._store.read_images(rows.img_seg, rows.img_off, rows.img_len)
            rows.vectors = np.asarray(embed(images), np.float32).reshape(len(rows), dim)
            self.reembedded += len(rows)
        gen = self._gen
        gen.index = FlatIndex(dim)  # a no-op index while the log replays
        gen.table.bulk_load(
            rows.fids,
            rows.vectors,
            rows.hashes,
            rows.id_bytes,
            rows.id_off,
            rows.labels,
            rows.label_idx,
            rows.img_seg,
            rows.img_off,
            rows.img_len,
        )
        if images is not None:  # not in a segment of this format yet
            gen.pending.update(zip(rows.fids.tolist(), images, strict=True))
            self._rewrite = True
        replayed = self._replay(records, embed)
        self._rewrite |= self.reembedded > 0
        self._build_tail()
        self._index_from_files(index, dim)  # replay went without one: built once here
        if not self.writes:
            return self
        (directory / ONLINE_TAIL).unlink(missing_ok=True)  # soft state of older versions
        if self.reembedded:
            log.info(
                "%s: re-embedded %d items for model %s", directory, self.reembedded, model_sha256
            )
        self._wal = WriteAheadLog(directory / WAL)
        self._since_snapshot = replayed
        if self._rewrite or replayed >= self.snapshot_every:
            self.snapshot()
        log.info("%s: %d items (%d log records replayed)", directory, self.size, replayed)
        return self

    def _index_from_files(self, index: str, dim: int) -> None:
        """The index over the loaded rows: the saved graph (HNSW) brought up to date, or
        built afresh when the rows were rewritten."""
        gen = self._gen
        gen.index = make_index(index, dim)
        if self._rewrite:
            gen.index.added(gen.table.view, gen.table.live_rows())
        else:
            gen.index.load(self.directory, gen.table.view)

    def _log_records(self) -> list[bytes]:
        """The log's intact records (a torn tail is cut off: this process owns the log)."""
        return read_records(self.directory / WAL)

    def _load_rows(self) -> tuple[Rows, list[bytes] | None, str]:
        """Live rows on disk, their images when they are not in segments, their model."""
        store = self._store
        if store.exists():
            rows, tombstones = store.load(collect=self.writes)
            live = np.flatnonzero(~np.isin(rows.fids, tombstones))
            m = store.manifest
            self._lsn, self._next_id = m.lsn, m.next_id
            return (rows.take(live) if len(live) < len(rows) else rows), None, m.model
        legacy = self.directory / LEGACY_SNAPSHOT
        if legacy.exists():
            return self._load_legacy(legacy)
        return Rows.empty(self.dim), None, self.model_sha256

    def _load_legacy(self, path: Path) -> tuple[Rows, list[bytes], str]:
        """A whole-gallery snapshot of the previous format: converted at the first
        checkpoint (its items go into a segment, then the file is deleted)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(data["meta"].tobytes())
                fids, vectors, offsets = data["ids"], data["vectors"], data["offsets"]
                blob = data["blob"].tobytes()
        except Exception as err:  # zip, npy or JSON damage: snapshots are atomic, so it is the disk
            raise SegmentError(
                f"{path}: unreadable gallery snapshot ({type(err).__name__}: {err}); restore it "
                "from a backup or move the tenant's folder away to start it empty"
            ) from err
        order = np.argsort(fids, kind="stable")
        pairs = [meta["items"][i] for i in order]
        images = [blob[offsets[i] : offsets[i + 1]] for i in order.tolist()]
        rows = _rows_of(
            fids[order].astype(np.int64),
            vectors[order],
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )
        self._lsn, self._next_id = meta["lsn"], meta["next_id"]
        return rows, images, meta["model"]

    def _replay(self, records: list[bytes], embed, tail: bool = False) -> int:
        """Apply the log records newer than the segments; ``tail``: keep the tail sample
        up to date as they apply (it is built once afterwards when opening)."""
        replayed = 0
        for payload in records:
            record, vector, image = _decode_record(payload, self.dim)
            if record["lsn"] <= self._lsn:
                continue  # already in a segment (crash between manifest and log reset)
            self._check_sequence(record["lsn"])
            replayed += 1
            if record["op"] == "add":
                fid = record["id"]
                self._next_id = max(self._next_id, fid + 1)
                if record["model"] != self.model_sha256:
                    vector = np.asarray(embed([image]), np.float32).reshape(self.dim)
                    self.reembedded += 1
                item = Item(record["item_id"], record["label"], image)
                old = self._gen.table.find(item.item_id)
                if old is not None:
                    self._apply_remove(np.array([old]), tail=tail)
                self._apply_add([fid], [item], vector[None, :], tail=tail)
            else:
                rows = [self._gen.table.find(i) for i in record["item_ids"]]
                found = np.array([r for r in rows if r is not None], np.int64)
                self._apply_remove(found, tail=tail)
            self._lsn = record["lsn"]  # once applied: a record that failed is not counted
        return replayed

    def _check_sequence(self, lsn: int) -> None:
        """The owner of the log trusts it as written (a checkpoint holds what precedes it)."""

    def _build_tail(self) -> None:
        """The sample is a function of the live items: their bottom-k id hashes."""
        gen = self._gen
        table = gen.table
        live = table.live_rows()
        cap = gen.tail.capacity
        if len(live) > cap:
            live = live[np.argpartition(table.hashes[live], cap - 1)[:cap]]
        gen.tail.add([self._entry(int(r)) for r in np.sort(live)])

    def _entry(self, row: int) -> Entry:
        t = self._gen.table
        return Entry(int(t.fids[row]), int(t.hashes[row]), t.vectors[row].copy(), int(t.codes[row]))

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
            table = self._gen.table
            outcome: list[str | None] = []
            accepted: list[int] = []
            replaced: list[int] = []
            seen: set[str] = set()
            for n, item in enumerate(items):
                row = table.find(item.item_id) if item.item_id not in seen else None
                if item.item_id in seen:
                    outcome.append("INVALID_ARGUMENT")
                elif row is not None and not replace:
                    outcome.append("ALREADY_EXISTS")
                else:
                    outcome.append(None)
                    accepted.append(n)
                    if row is not None:
                        replaced.append(row)
                seen.add(item.item_id)
            if not accepted:
                return outcome
            fids = list(range(self._next_id, self._next_id + len(accepted)))
            records = []
            for fid, n in zip(fids, accepted, strict=True):
                self._lsn += 1
                item = items[n]
                head = {"op": "add", "lsn": self._lsn, "id": fid, "item_id": item.item_id}
                head |= {"label": item.label, "model": model_sha256, "dim": self.dim}
                records.append(_encode_record(head, embeddings[n], item.image))
            self._wal_append(records)
            self._next_id += len(accepted)
            with self._lock:
                self._apply_remove(np.array(replaced, np.int64))
                self._apply_add(fids, [items[n] for n in accepted], embeddings[accepted])
            self._after_write(len(records))
            return outcome

    def remove(self, item_ids: list[str]) -> tuple[list[str], list[str]]:
        """Remove by id; returns (removed, not_found). Durable before it returns."""
        with self._write:
            table = self._gen.table
            rows = {i: table.find(i) for i in dict.fromkeys(item_ids)}
            found = [i for i, r in rows.items() if r is not None]
            missing = [i for i in item_ids if rows[i] is None]
            if found:
                self._lsn += 1
                head = {"op": "remove", "lsn": self._lsn, "item_ids": found}
                self._wal_append([_encode_record(head, None, b"")])
                with self._lock:
                    self._apply_remove(np.array([rows[i] for i in found], np.int64))
                self._after_write(1)
            return found, missing

    def prepare_rebuild(self, model_sha256: str, items: list[Item], embeddings: np.ndarray):
        """Nothing to stage in this process: :meth:`rebuild` switches in memory."""

    def rebuild(self, model_sha256: str, item_ids: list[str], embeddings: np.ndarray) -> None:
        """Switch to ``model_sha256`` with new embeddings for exactly the current items.

        The caller keeps mutations out meanwhile (the server's reload lock); the
        snapshot that follows makes the switch durable (a whole new generation on disk).
        """
        with self._write, self._lock:
            old = self._gen
            t = old.table
            live = t.live_rows()
            if sorted(item_ids) != sorted(t.item_id(int(r)) for r in live):
                raise RuntimeError("gallery changed during re-embedding; retry the reload")
            order = {item_id: n for n, item_id in enumerate(item_ids)}
            vectors = np.asarray(embeddings, np.float32)[[order[t.item_id(int(r))] for r in live]]
            gen = self._new_generation(model_sha256, vectors.shape[1])
            labels = [t.label(int(r)) for r in live]
            ids = [t.item_id(int(r)) for r in live]
            rows = _rows_of(t.fids[live], vectors, ids, labels, hashes=t.hashes[live])
            gen.table.bulk_load(
                rows.fids,
                rows.vectors,
                t.hashes[live],
                rows.id_bytes,
                rows.id_off,
                rows.labels,
                rows.label_idx,
                t.img_seg[live],
                t.img_off[live],
                t.img_len[live],
            )
            gen.pending = {f: old.pending[f] for f in rows.fids.tolist() if f in old.pending}
            self.dim = vectors.shape[1]
            self._gen = gen  # searches from here on see the new model at once
            self._build_tail()
            gen.index.added(gen.table.view, gen.table.live_rows())
            self._rewrite = True

    # ------------------------------------------------------------------ search
    def search(
        self, queries: np.ndarray, k: int, model_sha256: str, read_after: int = 0
    ) -> list[SearchResult]:
        """Top-``k`` neighbours per query.

        No gallery lock is held across the index search: it reads an immutable view.
        ``read_after`` (a write token) needs no wait here: writes apply before they return.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        gen = self._gen
        if gen.model != model_sha256:
            raise StaleModelError(f"gallery is on model {gen.model}, not {model_sha256}")
        view = gen.table.view
        if view.live == 0:
            return [SearchResult([]) for _ in range(len(queries))]
        k = max(1, min(k, view.live))
        sims, rows = gen.index.search(view, queries, k)
        if (rows[:, 0] < 0).any():  # an approximate search came back empty: be exact
            sims, rows = _EXACT.search(view, queries, k)
        labels = gen.table.labels
        return [
            SearchResult(
                [
                    Hit(view.item_id(r), _label(labels, int(view.codes[r])), float(s))
                    for s, r in zip(sims[q].tolist(), rows[q].tolist(), strict=True)
                    if r >= 0
                ]
            )
            for q in range(len(queries))
        ]

    def range_search(self, query: np.ndarray, threshold: float, model_sha256: str) -> list[Hit]:
        """Every live item with similarity >= ``threshold``, best first (exact, O(N))."""
        gen = self._gen
        if gen.model != model_sha256:
            raise StaleModelError(f"gallery is on model {gen.model}, not {model_sha256}")
        view = gen.table.view
        sims = view.vectors[: view.n] @ np.asarray(query, np.float32).reshape(-1)
        rows = np.flatnonzero((sims >= threshold) & view.alive[: view.n])
        rows = rows[np.argsort(-sims[rows], kind="stable")]
        labels = gen.table.labels
        return [
            Hit(view.item_id(r), _label(labels, int(view.codes[r])), float(sims[r]))
            for r in rows.tolist()
        ]

    # ------------------------------------------------------------------- items
    def items(self) -> list[Item]:
        """The current items (enrolment order), images read from disk, e.g. to re-embed."""
        with self._write:
            gen = self._gen
            t = gen.table
            live = t.live_rows()
            images = self._images(gen, live)
            return [
                Item(t.item_id(int(r)), t.label(int(r)), img)
                for r, img in zip(live.tolist(), images, strict=True)
            ]

    def get(self, item_id: str) -> Item | None:
        with self._lock:  # not the write lock: a slow fsync must not hold readers up
            gen = self._gen
            row = gen.table.find(item_id)
            if row is None:
                return None
            (image,) = self._images(gen, np.array([row]))
            return Item(item_id, gen.table.label(row), image)

    def _images(self, gen: _Generation, rows: np.ndarray) -> list[bytes]:
        t = gen.table
        on_disk = t.img_seg[rows] != PENDING
        out: list[bytes] = [gen.pending.get(int(t.fids[r]), b"") for r in rows.tolist()]
        idx = np.flatnonzero(on_disk)
        if len(idx):
            r = rows[idx]
            read = self._store.read_images(t.img_seg[r], t.img_off[r], t.img_len[r])
            for i, image in zip(idx.tolist(), read, strict=True):
                out[i] = image
        return out

    # -------------------------------------------------------------- checkpoints
    def snapshot(self) -> None:
        """Checkpoint: what changed since the last one becomes a segment, then the log
        is emptied and compaction runs. After a model change (or a legacy snapshot),
        the whole gallery is written as one new generation instead."""
        with self._write:
            if self._rewrite:
                self._write_generation()
            else:
                self._write_segment()
            if self._wal is not None:
                self._wal.reset()
            self._since_snapshot = 0
            self._compact()
            self._gen.index.save(self.directory, force=False)
            (self.directory / LEGACY_SNAPSHOT).unlink(missing_ok=True)

    def _write_segment(self) -> None:
        gen = self._gen
        t = gen.table
        with self._lock:
            pending = np.array(sorted(gen.pending), np.int64)
            rows = t.view.rows_of(pending) if len(pending) else pending
            images = [gen.pending[int(f)] for f in pending.tolist()]
            data = self._rows_from_table(rows)
            tombstones = np.array(gen.tombstones, np.int64)
        m = self._store.manifest
        if not len(rows) and not len(tombstones):  # e.g. an add removed again since the last
            if m.lsn != self._lsn:  # the log is emptied next: its numbers must be in the manifest
                self._store.commit(m.segments, self._lsn, self._next_id, gen.model, self.dim)
            return
        info = self._store.write_segment(data, images, tombstones)
        with self._lock:  # readers find the images in the new file from here on
            t.place_images(t.view.rows_of(pending), info.number, data.img_off, data.img_len)
        self._store.commit([*m.segments, info], self._lsn, self._next_id, gen.model, self.dim)
        with self._lock:
            for f in pending.tolist():
                gen.pending.pop(f, None)
            del gen.tombstones[: len(tombstones)]

    def _write_generation(self) -> None:
        """Every live item as one new segment; the manifest then names only it."""
        gen = self._gen
        t = gen.table
        live = t.live_rows()
        images = self._images(gen, live)
        data = self._rows_from_table(live)
        info = self._store.write_segment(data, images, np.zeros(0, np.int64))
        with self._lock:
            t.place_images(live, info.number, data.img_off, data.img_len)
        self._store.commit([info], self._lsn, self._next_id, gen.model, self.dim)
        with self._lock:
            gen.pending.clear()
            gen.tombstones.clear()
        self._gen.index.save(self.directory, force=True)
        self._rewrite = False

    def _rows_from_table(self, rows: np.ndarray) -> Rows:
        t = self._gen.table
        return _rows_of(
            t.fids[rows],
            t.vectors[rows],
            [t.item_id(int(r)) for r in rows],
            [t.label(int(r)) for r in rows],
            hashes=t.hashes[rows],
        )

    def _compact(self) -> None:
        """Merge segments while the tiered policy asks for it (bounded work per item)."""
        store = self._store
        while (plan := store.plan()) is not None:
            start, stop = plan
            info, merged = store.merge(start, stop, self._alive_fids)
            with self._lock:
                t = self._gen.table
                rows = t.view.rows_of(merged.fids)
                t.place_images(rows, info.number, merged.img_off, merged.img_len)
            m = store.manifest
            segments = [*m.segments[:start], info, *m.segments[stop:]]
            store.commit(segments, m.lsn, m.next_id, m.model, m.dim)

    def _alive_fids(self, fids: np.ndarray) -> np.ndarray:
        view = self._gen.table.view
        rows = view.rows_of(fids)
        ok = rows < view.n
        ok[ok] = (view.fids[rows[ok]] == fids[ok]) & view.alive[rows[ok]]
        return ok

    def _abandon(self) -> None:
        """An :meth:`open` that failed lets go of what it had opened."""
        if self._wal is not None:
            self._wal.close()
            self._wal = None

    def close(self) -> None:
        """Checkpoint if the log holds anything (faster next start), then close the log."""
        with self._write:
            if self._wal is not None:
                if self._wal.size() or self._rewrite:
                    self._try_snapshot()
                try:
                    self._gen.index.save(self.directory, force=True)
                except OSError as err:
                    log.warning("%s: could not save the index: %s", self.directory, err)
                self._wal.close()
                self._wal = None

    # ---------------------------------------------------------------- internal
    def _check_model(self, model_sha256: str) -> None:
        if model_sha256 != self._gen.model:
            raise StaleModelError(f"gallery is on model {self._gen.model}, not {model_sha256}")

    def _wal_append(self, records: list[bytes]) -> None:
        """Append durably the records that took the last ``len(records)`` sequence
        numbers; when it fails, those numbers are given back (the next write reuses
        them: a follower's sequence must have no hole)."""
        try:
            if self._wal is None:
                raise RuntimeError(f"gallery {self.directory} is closed")
            self._wal.append(records)
        except BaseException:
            self._lsn -= len(records)
            raise

    def _after_write(self, records: int) -> None:
        self._since_snapshot += records
        if self._since_snapshot >= self.snapshot_every:
            self._try_snapshot()

    def _try_snapshot(self) -> None:
        """A checkpoint only shortens replay: when it fails (disk full) the log still holds
        everything, so the acknowledged write stands and the next write tries again."""
        try:
            self.snapshot()
        except OSError as err:
            log.warning("%s: snapshot failed, the log keeps everything: %s", self.directory, err)

    def _apply_add(
        self, fids: list[int], items: list[Item], vectors: np.ndarray, tail: bool = True
    ) -> None:
        gen = self._gen
        table = gen.table
        rows = table.append(
            np.asarray(fids, np.int64),
            [i.item_id for i in items],
            [i.label for i in items],
            vectors,
        )
        if self.writes:  # images wait here for the next checkpoint; a follower needs none
            for fid, item in zip(fids, items, strict=True):
                gen.pending[fid] = item.image
        gen.index.added(table.view, rows)
        if tail:
            gen.tail.add([self._entry(int(r)) for r in rows])

    def _apply_remove(self, rows: np.ndarray, tail: bool = True) -> None:
        if not len(rows):
            return
        gen = self._gen
        table = gen.table
        fids = table.fids[rows].copy()
        if self.writes:  # what the next checkpoint writes
            for fid in fids.tolist():
                if gen.pending.pop(fid, None) is None:
                    gen.tombstones.append(fid)
            self._store.removed(fids)
        gen.index.removed(table.view, rows)
        table.kill(rows)
        if tail:
            left = gen.tail.remove(fids.tolist())
            if left:
                self._refill_tail(left)
        if table.dead_share() > COMPACT_DEAD_SHARE and table.view.n > 4096:
            table.compact()  # O(N), once per a quarter of the table removed

    def _refill_tail(self, n: int) -> None:
        """Members were removed: the ``n`` live non-members with the smallest hashes join,
        so the sample stays the bottom-k of the current items (O(N) numpy, and only when
        a removed item was a member)."""
        t = self._gen.table
        live = t.live_rows()
        members = t.view.rows_of(self._gen.tail.member_fids())
        outside = live[~np.isin(live, members, assume_unique=True)]
        if not len(outside):
            return
        order = np.lexsort((t.fids[outside], t.hashes[outside]))[:n]
        self._gen.tail.refill([self._entry(int(r)) for r in outside[order]])

    # ------------------------------------------------------------- normalisation
    def tail_snapshot(self) -> TailSnapshot:
        """The tail sample and its statistics as they are now (server/storage/tail_stats.py)."""
        with self._lock:
            return self._gen.tail.snapshot()

    def memory_bytes(self) -> int:
        """Bytes of the in-RAM columns beyond the vectors (the bench's per-item cost)."""
        gen = self._gen
        return gen.table.nbytes() + sum(len(i) for i in gen.pending.values())


_EXACT = FlatIndex(0)


def _label(labels: list[str], code: int) -> str:
    return "" if code >= UNLABELLED else labels[code]


def _rows_of(
    fids: np.ndarray,
    vectors: np.ndarray,
    item_ids: list[str],
    labels: list[str],
    hashes: np.ndarray | None = None,
) -> Rows:
    """Segment rows from Python lists (ids, labels) and arrays."""
    encoded = [i.encode() for i in item_ids]
    off = np.zeros(len(encoded) + 1, np.int64)
    off[1:] = np.cumsum([len(b) for b in encoded]) if encoded else []
    table: dict[str, int] = {}
    idx = np.array([table.setdefault(lab, len(table)) if lab else -1 for lab in labels], np.int64)
    if hashes is None:
        hashes = np.array([item_hash(i) for i in item_ids], np.int64)
    z = np.zeros(len(fids), np.int64)
    return Rows(
        fids=np.asarray(fids, np.int64),
        hashes=np.asarray(hashes, np.int64),
        vectors=np.asarray(vectors, np.float32),
        id_bytes=np.frombuffer(b"".join(encoded), np.uint8).copy(),
        id_off=off,
        labels=list(table),
        label_idx=idx,
        img_seg=np.full(len(fids), PENDING, np.int32),  # images not in a segment yet
        img_off=z,
        img_len=z.astype(np.int32),
    )


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
