"""A tenant's impostor score statistics, kept up to date as its gallery changes.

Score normalisation (scorenorm/) maps a tenant's scores through its own upper-tail
impostor distribution. Here that distribution is estimated without query labels from
two sources:

- **gallery pairs**: every pair of items with different enrolment identities inside a
  *sample* of the gallery: the items with the ``capacity`` smallest hashes of their id
  (a bottom-k sketch). The sample is a deterministic function of the set of items, so a
  gallery rebuilt after a crash has exactly the statistics it had before; enrolling or
  removing an item changes at most a few members and costs O(capacity x dim), never a
  rebuild;
- **online pairs** (optional): scores of queries against a few sampled members,
  leaving out the identity a query was matched to, in a sliding window; their weight
  in the mix is capped (``online_weight``), because a tenant's own traffic must not be
  able to drag its threshold far from what its gallery says.

Pair scores are the project's (scorenorm.pairs.scores): adding and later removing an
item's pairs cancels bin for bin.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass

import numpy as np

from scorenorm import ScoreHistogram, gallery_histogram
from scorenorm.histogram import NBINS, bin_of, mix

DEFAULT_CAPACITY = 4096  # gallery items in the sample: up to 8.4M pairs
ONLINE_CHUNK = 1 << 16  # pairs per window chunk
ONLINE_CHUNKS = 16  # chunks in the window (~1M pairs)
ONLINE_QUERIES = 4  # queries of a micro-batch observed (a bounded cost per search call)
ONLINE_PER_QUERY = 32  # sampled members scored per observed query


def item_hash(item_id: str) -> int:
    """A stable 63-bit hash of an item id (the same in every process and release)."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Entry:
    fid: int
    hash: int
    vector: np.ndarray
    code: int  # identity code (items sharing a label share a code)


class TenantTail:
    """The sample, its pair histogram and the online window of one tenant's gallery.

    Members live in preallocated rows (float64 for the exact pair scores, float32 for
    the online GEMM); removing one moves the last row into its place, so enrolling or
    removing costs O(capacity x dim) arithmetic and O(1) bookkeeping. Not thread-safe
    on its own: the gallery calls it under its index lock.
    """

    def __init__(self, dim: int, capacity: int = DEFAULT_CAPACITY, online_weight: float = 0.5):
        if capacity < 2:
            raise ValueError(f"the tail sample needs capacity >= 2, got {capacity}")
        if not 0.0 <= online_weight <= 1.0:
            raise ValueError(f"online_weight must lie in [0, 1], got {online_weight}")
        self.dim = dim
        self.capacity = capacity
        self.online_weight = online_weight
        self._n = 0
        self._x64 = np.zeros((0, dim), np.float64)  # grown on demand up to capacity rows
        self._x32 = np.zeros((0, dim), np.float32)
        self._codes = np.zeros(0, np.int64)
        self._hashes = np.zeros(0, np.int64)
        self._fids = np.zeros(0, np.int64)
        self._row: dict[int, int] = {}  # fid -> row
        self.gallery = ScoreHistogram()
        self._online: deque[ScoreHistogram] = deque(maxlen=ONLINE_CHUNKS)
        self._rng = np.random.default_rng(0)
        self.version = 0  # bumped on every change the map must follow
        self.members_version = 0  # bumped when the sample's members change

    # ------------------------------------------------------------------ the sample
    @property
    def members(self) -> int:
        return self._n

    def is_member(self, fid: int) -> bool:
        return fid in self._row

    def member_fids(self) -> np.ndarray:
        """The members' ids, a copy (without their vectors, unlike ``sample``)."""
        return self._fids[: self._n].copy()

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fids, vectors, identity codes) of the members, copies."""
        n = self._n
        return self._fids[:n].copy(), self._x32[:n].copy(), self._codes[:n].copy()

    def add(self, entries: list[Entry]) -> None:
        """Items enrolled: the sample becomes the bottom-``capacity`` of old and new."""
        if not entries:
            return
        n = self._n
        hashes = np.concatenate([self._hashes[:n], [e.hash for e in entries]])
        if len(hashes) <= self.capacity:
            self._add_members(entries)
            return
        keep = np.zeros(len(hashes), bool)
        keep[np.argpartition(hashes, self.capacity - 1)[: self.capacity]] = True
        self._drop_rows(np.flatnonzero(~keep[:n]))
        self._add_members([e for j, e in enumerate(entries) if keep[n + j]])

    def remove(self, fids: list[int]) -> int:
        """Items removed; returns how many were members (the caller refills that many)."""
        rows = np.array([self._row[f] for f in fids if f in self._row], np.int64)
        self._drop_rows(rows)
        return len(rows)

    def refill(self, entries: list[Entry]) -> None:
        """Non-members with the smallest hashes, after members were removed."""
        self._add_members(entries[: self.capacity - self._n])

    def _add_members(self, entries: list[Entry]) -> None:
        if not entries:
            return
        x = np.stack([e.vector for e in entries]).astype(np.float32)
        codes = np.array([e.code for e in entries], np.int64)
        counts = _pair_counts(x, codes, self._x64[: self._n], self._codes[: self._n])
        counts += gallery_histogram(x, codes).counts
        self.gallery = ScoreHistogram(
            self.gallery.counts + counts, self.gallery.total + int(counts.sum())
        )
        self._grow(self._n + len(entries))
        rows = slice(self._n, self._n + len(entries))
        self._x32[rows], self._x64[rows], self._codes[rows] = x, x, codes
        self._hashes[rows] = [e.hash for e in entries]
        self._fids[rows] = [e.fid for e in entries]
        for n, e in enumerate(entries):
            self._row[e.fid] = self._n + n
        self._n += len(entries)
        self.version += 1
        self.members_version += 1

    def _grow(self, need: int) -> None:
        if need <= len(self._fids):
            return
        size = min(self.capacity, max(need, 2 * len(self._fids), 16))
        for name in ("_x64", "_x32", "_codes", "_hashes", "_fids"):
            old = getattr(self, name)
            new = np.zeros((size, *old.shape[1:]), old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def _drop_rows(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        n = self._n
        gone = np.zeros(n, bool)
        gone[rows] = True
        x, codes = self._x32[:n][gone], self._codes[:n][gone]
        # pairs with the members that stay (masking the leaving ones: no copy of the rest)
        counts = _pair_counts(x, codes, self._x64[:n], self._codes[:n], skip=gone)
        counts += gallery_histogram(x, codes).counts
        self.gallery = ScoreHistogram(
            self.gallery.counts - counts, self.gallery.total - int(counts.sum())
        )
        for r in sorted(rows.tolist(), reverse=True):  # move the last row into each hole
            last = self._n - 1
            del self._row[int(self._fids[r])]
            if r != last:
                for name in ("_x64", "_x32", "_codes", "_hashes", "_fids"):
                    arr = getattr(self, name)
                    arr[r] = arr[last]
                self._row[int(self._fids[r])] = r
            self._n -= 1
        self.version += 1
        self.members_version += 1

    # ------------------------------------------------------------------ online pairs
    def observe(self, queries: np.ndarray, matched_codes: list[int | None]) -> None:
        """Scores of each query against ONLINE_PER_QUERY random members (drawn with
        replacement), leaving out the identity it was matched to (an unmatched query keeps
        every pair: it is most likely an impostor of every member, its best one included).

        The map follows the window chunk by chunk: ``version`` moves when a chunk fills,
        not on every query, so serving does not rebuild maps per call.
        """
        if self.online_weight == 0 or self.members < 2 or not len(queries):
            return
        queries, matched_codes = queries[:ONLINE_QUERIES], matched_codes[:ONLINE_QUERIES]
        picks = self._rng.integers(0, self._n, size=(len(queries), ONLINE_PER_QUERY))
        rows = self._x32[picks]  # (q, k, dim)
        s = np.einsum("qd,qkd->qk", np.asarray(queries, np.float32), rows)
        matched = np.array([-1 if c is None else c for c in matched_codes], np.int64)
        keep = self._codes[picks] != matched[:, None]  # codes are >= 0: -1 keeps all
        flat = s[keep]
        if not len(flat):
            return
        if not self._online:
            self._online.append(ScoreHistogram())
        self._online[-1].add(flat)
        if self._online[-1].total >= ONLINE_CHUNK:
            self._online.append(ScoreHistogram())  # the oldest chunk drops out at maxlen
            self.version += 1

    def online(self) -> ScoreHistogram:
        out = ScoreHistogram()
        for chunk in self._online:
            out = out.merged(chunk)
        return out

    def histogram(self) -> ScoreHistogram:
        """Gallery pairs mixed with the online window, the online share capped."""
        return mix(self.gallery, self.online(), self.online_weight)

    def online_state(self) -> dict[str, np.ndarray]:
        """The online window as arrays, to persist next to the gallery snapshot."""
        if not self._online:
            return {}
        return {
            "online_counts": np.stack([c.counts for c in self._online]),
            "online_totals": np.array([c.total for c in self._online], np.int64),
        }

    def restore_online(self, state: dict[str, np.ndarray]) -> None:
        self._online.clear()
        counts, totals = state.get("online_counts"), state.get("online_totals")
        if counts is None or totals is None or counts.shape[-1] != NBINS:
            return
        for c, t in zip(counts, totals, strict=True):
            self._online.append(ScoreHistogram(c, int(t)))
        self.version += 1


def _pair_counts(
    x: np.ndarray,
    codes: np.ndarray,
    m64: np.ndarray,
    m_codes: np.ndarray,
    skip: np.ndarray | None = None,
) -> np.ndarray:
    """Bin counts of the cross-identity pairs (x_i, member_j), members already in float64
    (the project's pair score, no conversion per call); ``skip`` masks members out."""
    counts = np.zeros(NBINS, np.int64)
    if not len(x) or not len(m64):
        return counts
    s = (x.astype(np.float64) @ m64.T).astype(np.float32)
    other = codes[:, None] != m_codes[None, :]
    if skip is not None:
        other &= ~skip[None, :]
    return np.bincount(bin_of(s[other]), minlength=NBINS)
