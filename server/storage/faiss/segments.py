"""A gallery on disk: immutable segments, a manifest, and tiered compaction.

The old snapshot rewrote the whole gallery (every vector, every image) every 1,000
log records: O(N) per snapshot and O(N^2) to reach N items. Here a checkpoint writes
only what changed since the last one, as a new **segment**: the rows added (stable
id, id hash, item id, label, vector, and the images in a side file) and the stable
ids removed from older segments (tombstones). The **manifest** (written atomically
after the segment) names the live segments and the log position they cover; the
write-ahead log is emptied after it. Opening reads the segments in order, applies
the tombstones, then replays the log records newer than the manifest.

**Compaction** merges the trailing segments when ``FAN`` of them sit in the same size
tier (tier = log base FAN of live rows over the checkpoint size), dropping removed
rows and applied tombstones, and never produces a segment over ``max_rows``: an item
is rewritten at most log_FAN(max_rows / checkpoint) times (3 with the defaults)
whatever the gallery's size, so enrolment stays O(1) amortised. A segment whose rows
are mostly removed is rewritten on its own. Files not named by the manifest (left by
a crash between writing a segment and its manifest, or by a compaction) are deleted
on open.

Images are read back only to re-embed (``read_images``); RAM holds where they are.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from contracts.files import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
FAN = 4
MAX_ROWS = 1 << 16


class SegmentError(ValueError):
    """The gallery's files cannot be read; the message says what to do."""


@dataclass
class SegmentInfo:
    number: int
    rows: int
    live: int
    first_fid: int
    last_fid: int

    @property
    def name(self) -> str:
        return f"seg-{self.number:08d}"


@dataclass
class Manifest:
    lsn: int = 0
    next_id: int = 0
    model: str = ""
    dim: int = 0
    next_segment: int = 1
    segments: list[SegmentInfo] = field(default_factory=list)

    def to_json(self) -> str:
        body = asdict(self) | {"format": FORMAT}
        return json.dumps(body, separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.pop("format", None) != FORMAT:
            raise SegmentError("unknown manifest format")
        raw["segments"] = [SegmentInfo(**s) for s in raw["segments"]]
        return cls(**raw)


@dataclass
class Rows:
    """Column data of rows on their way to or from a segment."""

    fids: np.ndarray
    hashes: np.ndarray
    vectors: np.ndarray
    id_bytes: np.ndarray  # concatenated UTF-8 item ids
    id_off: np.ndarray  # len + 1 offsets into id_bytes
    labels: list[str]  # label table of these rows
    label_idx: np.ndarray  # index into ``labels``, -1 = no label
    img_seg: np.ndarray  # segment number holding each image
    img_off: np.ndarray
    img_len: np.ndarray

    def __len__(self) -> int:
        return len(self.fids)

    def item_ids(self) -> list[str]:
        raw = self.id_bytes.tobytes()
        off = self.id_off.tolist()
        return [raw[off[i] : off[i + 1]].decode() for i in range(len(self.fids))]

    def row_labels(self) -> list[str]:
        return ["" if i < 0 else self.labels[i] for i in self.label_idx.tolist()]

    @classmethod
    def empty(cls, dim: int) -> Rows:
        z = np.zeros(0, np.int64)
        return cls(
            z,
            z,
            np.zeros((0, dim), np.float32),
            np.zeros(0, np.uint8),
            np.zeros(1, np.int64),
            [],
            z,
            z.astype(np.int32),
            z,
            z.astype(np.int32),
        )

    def take(self, keep: np.ndarray) -> Rows:
        """The rows at positions ``keep`` (in order)."""
        pieces = [self.id_bytes[self.id_off[i] : self.id_off[i + 1]] for i in keep.tolist()]
        lengths = np.fromiter((len(p) for p in pieces), np.int64, len(keep))
        off = np.zeros(len(keep) + 1, np.int64)
        off[1:] = np.cumsum(lengths)
        ids = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        return Rows(
            self.fids[keep],
            self.hashes[keep],
            self.vectors[keep],
            ids,
            off,
            self.labels,
            self.label_idx[keep],
            self.img_seg[keep],
            self.img_off[keep],
            self.img_len[keep],
        )

    @staticmethod
    def concat(parts: list[Rows], dim: int) -> Rows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Rows.empty(dim)
        labels: list[str] = []
        where: dict[str, int] = {}
        idx, offs, base = [], [], 0
        for p in parts:
            remap = np.array([where.setdefault(lab, len(where)) for lab in p.labels] + [-1])
            labels = list(where)
            idx.append(remap[p.label_idx])  # -1 indexes the trailing -1
            offs.append(p.id_off[1:] + base)
            base += int(p.id_off[-1])
        return Rows(
            np.concatenate([p.fids for p in parts]),
            np.concatenate([p.hashes for p in parts]),
            np.concatenate([p.vectors for p in parts]),
            np.concatenate([p.id_bytes for p in parts]),
            np.concatenate([np.zeros(1, np.int64), *offs]),
            labels,
            np.concatenate(idx),
            np.concatenate([p.img_seg for p in parts]),
            np.concatenate([p.img_off for p in parts]),
            np.concatenate([p.img_len for p in parts]),
        )


class SegmentStore:
    """The segment files and manifest of one gallery directory."""

    def __init__(self, directory: Path, checkpoint_rows: int = 1000, max_rows: int = MAX_ROWS):
        self.directory = directory
        self.base = max(1, checkpoint_rows)
        self.max_rows = max_rows
        self.manifest = Manifest()

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return (self.directory / MANIFEST).exists()

    def load_manifest(self) -> Manifest:
        """Read the manifest (SegmentError when it cannot be)."""
        path = self.directory / MANIFEST
        try:
            self.manifest = Manifest.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SegmentError(
                f"{path}: unreadable gallery manifest ({type(err).__name__}: {err}); restore "
                "the tenant's folder from a backup or move it away to start it empty"
            ) from err
        return self.manifest

    def load(self, collect: bool = True) -> tuple[Rows, np.ndarray]:
        """(rows of every segment in order, all tombstones); ``collect``: remove stray
        files (only the process that writes the directory may: to a reader, a segment
        being written looks stray)."""
        self.load_manifest()
        parts, tombs = [], []
        for info in self.manifest.segments:
            rows, dead = self._read(info)
            parts.append(rows)
            tombs.append(dead)
        if collect:
            self._collect_garbage()
        dim = self.manifest.dim
        return Rows.concat(parts, dim), np.concatenate([np.zeros(0, np.int64), *tombs])

    def _read(self, info: SegmentInfo) -> tuple[Rows, np.ndarray]:
        path = self.directory / f"{info.name}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                labels = json.loads(data["labels"].tobytes())
                rows = Rows(
                    data["fids"],
                    data["hashes"],
                    data["vectors"],
                    data["id_bytes"],
                    data["id_off"],
                    labels,
                    data["label_idx"],
                    np.full(len(data["fids"]), info.number, np.int32),
                    data["img_off"],
                    data["img_len"],
                )
                return rows, data["tombstones"]
        except Exception as err:  # zip/npy/JSON damage: segments are atomic, so it is the disk
            raise SegmentError(
                f"{path}: unreadable gallery segment ({type(err).__name__}: {err}); restore "
                "the tenant's folder from a backup or move it away to start it empty"
            ) from err

    def read_images(self, seg: np.ndarray, off: np.ndarray, length: np.ndarray) -> list[bytes]:
        """Image bytes at the given places (grouped per segment file, read in order)."""
        out: list[bytes] = [b""] * len(seg)
        for number in np.unique(seg).tolist():
            idx = np.flatnonzero(seg == number)
            path = self.directory / f"seg-{number:08d}.img"
            with path.open("rb") as handle:
                for i in idx[np.argsort(off[idx], kind="stable")].tolist():
                    handle.seek(int(off[i]))
                    out[i] = handle.read(int(length[i]))
        return out

    # ------------------------------------------------------------------ writing
    def write_segment(
        self, rows: Rows, images: list[bytes], tombstones: np.ndarray, live: int | None = None
    ) -> SegmentInfo:
        """Write one segment (images first, then the columns); not yet in the manifest."""
        number = self.manifest.next_segment
        self.manifest.next_segment += 1
        lengths = np.fromiter((len(i) for i in images), np.int64, len(images))
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(images) else lengths
        info = SegmentInfo(
            number,
            len(rows),
            len(rows) if live is None else live,
            int(rows.fids[0]) if len(rows) else -1,
            int(rows.fids[-1]) if len(rows) else -1,
        )
        atomic_write_bytes(self.directory / f"{info.name}.img", b"".join(images))
        buffer = io.BytesIO()
        np.savez(
            buffer,
            fids=rows.fids.astype(np.int64),
            hashes=rows.hashes.astype(np.int64),
            vectors=np.asarray(rows.vectors, np.float32),
            id_bytes=rows.id_bytes.astype(np.uint8),
            id_off=rows.id_off.astype(np.int64),
            labels=np.frombuffer(json.dumps(rows.labels).encode(), np.uint8),
            label_idx=rows.label_idx.astype(np.int64),
            img_off=offsets.astype(np.int64),
            img_len=lengths.astype(np.int32),
            tombstones=np.asarray(tombstones, np.int64),
        )
        atomic_write_bytes(self.directory / f"{info.name}.npz", buffer.getvalue())
        rows.img_seg = np.full(len(rows), number, np.int32)
        rows.img_off, rows.img_len = offsets.astype(np.int64), lengths.astype(np.int32)
        return info

    def commit(
        self, segments: list[SegmentInfo], lsn: int, next_id: int, model: str, dim: int
    ) -> None:
        """Make ``segments`` the gallery (atomic manifest), then delete what it dropped."""
        old = {s.name for s in self.manifest.segments}
        m = self.manifest
        m.segments, m.lsn, m.next_id, m.model, m.dim = segments, lsn, next_id, model, dim
        atomic_write_bytes(self.directory / MANIFEST, m.to_json().encode())
        for name in old - {s.name for s in segments}:
            for suffix in (".npz", ".img"):
                (self.directory / f"{name}{suffix}").unlink(missing_ok=True)

    def _collect_garbage(self) -> None:
        keep = {s.name for s in self.manifest.segments}
        removed = False
        for path in self.directory.glob("seg-*"):
            if path.name.split(".")[0] not in keep:
                path.unlink(missing_ok=True)
                removed = True
        if removed:
            fsync_dir(self.directory)

    # -------------------------------------------------------------- compaction
    def tier(self, live: int) -> int:
        t, size = 0, self.base
        while live > size:
            size *= FAN
            t += 1
        return t

    def plan(self) -> tuple[int, int] | None:
        """The [start, stop) run of segments to merge next, or None."""
        segs = self.manifest.segments
        for n, s in enumerate(segs):  # mostly removed: rewrite it alone
            if s.rows >= self.base and s.live * 2 < s.rows:
                return n, n + 1
        if len(segs) < FAN:
            return None
        run = segs[-FAN:]
        tiers = {self.tier(s.live) for s in run}
        if len(tiers) == 1 and sum(s.live for s in run) <= self.max_rows:
            return len(segs) - FAN, len(segs)
        return None

    def removed(self, fids: np.ndarray) -> None:
        """Count removals against the segments holding them (for the rewrite rule)."""
        segs = self.manifest.segments
        if not segs or not len(fids):
            return
        firsts = np.array([s.first_fid for s in segs])
        for fid, n in zip(
            fids.tolist(), (np.searchsorted(firsts, fids, "right") - 1).tolist(), strict=True
        ):
            if n >= 0 and fid <= segs[n].last_fid:
                segs[n].live = max(0, segs[n].live - 1)

    def merge(self, start: int, stop: int, alive) -> tuple[SegmentInfo, Rows]:
        """Merge segments [start, stop) into one new segment (not yet committed).

        ``alive(fids) -> bool mask`` says which rows survive. Tombstones of fids older
        than the run are kept; the others were applied by dropping their rows.
        """
        run = self.manifest.segments[start:stop]
        parts, tombs = [], []
        for info in run:
            rows, dead = self._read(info)
            parts.append(rows.take(np.flatnonzero(alive(rows.fids))))
            tombs.append(dead[dead < run[0].first_fid])
        merged = Rows.concat(parts, self.manifest.dim)
        images = self.read_images(merged.img_seg, merged.img_off, merged.img_len)
        info = self.write_segment(merged, images, np.concatenate([np.zeros(0, np.int64), *tombs]))
        if not len(merged):  # keep the fid range of what it replaces for removal counting
            info.first_fid, info.last_fid = run[0].first_fid, run[-1].last_fid
        return info, merged

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("seg-*"))

    def flush_dir(self) -> None:
        fsync_dir(self.directory)
