"""A tenant's gallery sample and its impostor pair statistics, kept up to date as the
gallery changes.

Score normalisation (scorenorm/) needs each tenant's impostor score distribution. The
gallery's share of that evidence lives here, with the store, because every replica must
compute it alike from what the store holds:

- **the sample**: the items with the ``capacity`` smallest hashes of their id (a
  bottom-k sketch). It is a deterministic function of the set of items, so a gallery
  rebuilt after a crash, or read by another replica, has exactly these statistics;
  enrolling or removing an item changes at most a few members and costs
  O(capacity x dim), never a rebuild;
- **its pair histogram**: every pair of members with different enrolment identities.
  Pairs scoring at or above ``DUPLICATE`` are the same picture under two ids or labels
  (an item enrolled twice, one identity under two labels): they say nothing about how
  far apart *different* identities score, so they are set aside and only counted
  (``duplicates``), never taken as impostor evidence;
- **the null**: each sampled member's rank-1 score against the members of other
  identities, and its location (scorenorm.traffic.rank1_null): what
  an impostor query's rank-1 score looks like, against which the share of genuine
  queries in the tenant's unlabelled traffic is judged.

The traffic itself (what queries score against the sample) is counted above the store,
in server/matching/statistics.py. Pair scores are the project's
(scorenorm.pairs.scores): adding and later removing an item's pairs cancels bin for bin.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np

from scorenorm import ScoreHistogram
from scorenorm.histogram import NBINS, bin_of
from scorenorm.traffic import Null, rank1_null

DEFAULT_CAPACITY = 4096  # gallery items in the sample: up to 8.4M pairs
DUPLICATE = 0.999  # pair score from which two items are one picture, not two identities
NULL_ROWS = 256  # members whose rank-1 residuals make the null (a bounded cost)
_FIRST_VERSIONS = itertools.count()


def item_hash(item_id: str) -> int:
    """A stable 63-bit hash of an item id (the same in every process and release)."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class TailSnapshot:
    """What the statistics above the store read of a tail, immutable: taken under the
    gallery's lock, used without it."""

    version: int
    vectors: np.ndarray  # the members, float32 (queries are scored against them)
    codes: np.ndarray  # their identity codes
    gallery: ScoreHistogram  # pairs of members with different identities
    duplicates: int  # member pairs set aside as one picture
    null: Null  # the members' own rank-1 scores (scorenorm.traffic)


@dataclass(frozen=True)
class Entry:
    fid: int
    hash: int
    vector: np.ndarray
    code: int  # identity code (items sharing a label share a code)


class TenantTail:
    """The sample, its pair histogram and its null, of one tenant's gallery.

    Members live in preallocated rows (float64 for the exact pair scores, float32 for
    the traffic GEMM); removing one moves the last row into its place, so enrolling or
    removing costs O(capacity x dim) arithmetic and O(1) bookkeeping. Not thread-safe
    on its own: the gallery calls it under its index lock.
    """

    def __init__(self, dim: int, capacity: int = DEFAULT_CAPACITY):
        if capacity < 2:
            raise ValueError(f"the tail sample needs capacity >= 2, got {capacity}")
        self.dim = dim
        self.capacity = capacity
        self._n = 0
        self._x64 = np.zeros((0, dim), np.float64)  # grown on demand up to capacity rows
        self._x32 = np.zeros((0, dim), np.float32)
        self._codes = np.zeros(0, np.int64)
        self._hashes = np.zeros(0, np.int64)
        self._fids = np.zeros(0, np.int64)
        self._row: dict[int, int] = {}  # fid -> row
        self.gallery = ScoreHistogram()
        self.duplicates = 0  # member pairs set aside as one picture (>= DUPLICATE)
        # bumped on every change of the members; starts at a value no other tail of this
        # process used, so a cache keyed by it never mistakes a rebuilt tail for an old one
        self.version = next(_FIRST_VERSIONS) << 32
        self._null: tuple[int, Null] | None = None
        self._snapshot: TailSnapshot | None = None

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
        counts, dups = _pair_counts(x, codes, self._x64[: self._n], self._codes[: self._n])
        within, within_dups = _pair_counts(x, codes, x.astype(np.float64), codes, upper=True)
        self._count(counts + within, dups + within_dups, 1)
        self._grow(self._n + len(entries))
        rows = slice(self._n, self._n + len(entries))
        self._x32[rows], self._x64[rows], self._codes[rows] = x, x, codes
        self._hashes[rows] = [e.hash for e in entries]
        self._fids[rows] = [e.fid for e in entries]
        for n, e in enumerate(entries):
            self._row[e.fid] = self._n + n
        self._n += len(entries)
        self.version += 1

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
        counts, dups = _pair_counts(x, codes, self._x64[:n], self._codes[:n], skip=gone)
        within, within_dups = _pair_counts(x, codes, x.astype(np.float64), codes, upper=True)
        self._count(counts + within, dups + within_dups, -1)
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

    def _count(self, counts: np.ndarray, duplicates: int, sign: int) -> None:
        self.gallery = ScoreHistogram(
            self.gallery.counts + sign * counts, self.gallery.total + sign * int(counts.sum())
        )
        self.duplicates += sign * duplicates

    def snapshot(self) -> TailSnapshot:
        """The current members, histogram and null; copied once per change of members."""
        if self._snapshot is None or self._snapshot.version != self.version:
            n = self._n
            self._snapshot = TailSnapshot(
                self.version,
                self._x32[:n].copy(),
                self._codes[:n].copy(),
                self.gallery,
                self.duplicates,
                self.null(),
            )
        return self._snapshot

    # ------------------------------------------------------------------ the null
    def null(self) -> Null:
        """Rank-1 residuals of up to NULL_ROWS members (the lowest hashes: deterministic)
        against the members of other identities; cached until the members change."""
        if self._null is not None and self._null[0] == self.version:
            return self._null[1]
        n = self._n
        rows = np.argsort(self._hashes[:n], kind="stable")[:NULL_ROWS]
        s = self._x32[rows] @ self._x32[:n].T
        s[self._codes[rows][:, None] == self._codes[:n][None, :]] = -np.inf
        s[s >= DUPLICATE] = -np.inf  # one picture twice is no impostor's best score
        values = rank1_null(s)
        self._null = (self.version, values)
        return values


def _pair_counts(
    x: np.ndarray,
    codes: np.ndarray,
    m64: np.ndarray,
    m_codes: np.ndarray,
    skip: np.ndarray | None = None,
    upper: bool = False,
) -> tuple[np.ndarray, int]:
    """Bin counts of the cross-identity pairs (x_i, member_j), members already in float64
    (the project's pair score, no conversion per call), and how many of them are
    near-duplicates (set aside). ``skip`` masks members out; ``upper`` counts each pair
    of x with itself once (x against x)."""
    counts = np.zeros(NBINS, np.int64)
    if not len(x) or not len(m64):
        return counts, 0
    s = (x.astype(np.float64) @ m64.T).astype(np.float32)
    other = codes[:, None] != m_codes[None, :]
    if skip is not None:
        other &= ~skip[None, :]
    if upper:
        other &= np.arange(len(x))[:, None] < np.arange(len(m64))[None, :]
    dup = other & (s >= DUPLICATE)
    return np.bincount(bin_of(s[other & ~dup]), minlength=NBINS), int(dup.sum())
