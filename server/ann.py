"""Approximate search for large galleries: HNSW top-k plus sampled label-free counts.

The exact flat index stays the gallery's source of truth (snapshots, removal); this
is a second index over the same vectors that answers top-k in roughly logarithmic
time. HNSW cannot delete, so removed items become tombstones excluded during the
graph search (an ``IDSelectorNot``) and the graph is rebuilt once a fifth of it is
dead.

Exact label-free counts need every gallery item per query (O(N)), which is what an
approximate index is meant to avoid; here they are counted on a uniform random
sample of at most ``sample_size`` items, so ``impostor_total`` is the number of
sampled pairs behind the estimate and the ratio stays unbiased.
"""

from __future__ import annotations

import faiss
import numpy as np


class HnswTopK:
    """HNSW over (vector, faiss id) pairs with tombstones and a counting sample."""

    def __init__(
        self, dim: int, m: int = 32, ef_search: int = 64, sample_size: int = 4096, seed: int = 0
    ) -> None:
        self.dim, self.m, self.ef_search, self.sample_size = dim, m, ef_search, sample_size
        self._rng = np.random.default_rng(seed)
        self._reset()

    def _reset(self) -> None:
        self.index = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efSearch = self.ef_search
        self._fids = np.zeros(0, np.int64)  # HNSW position -> gallery (faiss) id
        self._position: dict[int, int] = {}
        self._dead: set[int] = set()  # positions of removed items
        self._sample: dict[int, np.ndarray] = {}  # gallery id -> vector
        self._sample_matrix: tuple[np.ndarray, np.ndarray] | None = None
        self._seen = 0

    @property
    def live(self) -> int:
        return len(self._fids) - len(self._dead)

    def add(self, vectors: np.ndarray, fids: np.ndarray) -> None:
        start = len(self._fids)
        self.index.add(np.ascontiguousarray(vectors, np.float32))
        self._fids = np.concatenate([self._fids, fids.astype(np.int64)])
        for n, fid in enumerate(fids):
            self._position[int(fid)] = start + n
            self._seen += 1
            # reservoir sampling keeps the sample uniform over everything added
            if len(self._sample) < self.sample_size:
                self._sample[int(fid)] = vectors[n].copy()
            elif self._rng.random() < self.sample_size / self._seen:
                victim = list(self._sample)[int(self._rng.integers(len(self._sample)))]
                del self._sample[victim]
                self._sample[int(fid)] = vectors[n].copy()
        self._sample_matrix = None

    def remove(self, fids: list[int]) -> None:
        for fid in fids:
            position = self._position.pop(int(fid), None)
            if position is not None:
                self._dead.add(position)
            if self._sample.pop(int(fid), None) is not None:
                self._sample_matrix = None

    def needs_rebuild(self) -> bool:
        return len(self._dead) > max(64, len(self._fids) // 5)

    def rebuild(self, vectors: np.ndarray, fids: np.ndarray) -> None:
        """Start over from the live items (drops tombstones, resamples)."""
        self._reset()
        if len(fids):
            self.add(vectors, fids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, gallery ids) of the approximate top-k; -1 ids pad missing slots."""
        params = None
        if self._dead:
            dead = np.fromiter(self._dead, np.int64)
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead))
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, k))
            params.referenced = selector  # keep it alive as long as the parameters
        elif k > self.ef_search:
            params = faiss.SearchParametersHNSW(efSearch=k)
        sims, positions = self.index.search(queries, k, params=params)
        ids = np.where(positions >= 0, self._fids[np.maximum(positions, 0)], -1)
        return sims, ids

    def label_free(
        self, queries: np.ndarray, top_codes: np.ndarray, code_of: np.ndarray, threshold: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(accepted, total) per query on the sample: items of another identity than the
        top-1's, and those of them with similarity >= threshold."""
        if self._sample_matrix is None:
            fids = np.fromiter(self._sample, np.int64, len(self._sample))
            vectors = np.stack(list(self._sample.values())) if len(fids) else None
            self._sample_matrix = (fids, vectors)
        fids, vectors = self._sample_matrix
        if vectors is None:
            zero = np.zeros(len(queries), np.int64)
            return zero, zero
        other = code_of[fids][None, :] != top_codes[:, None]
        accepted = ((queries @ vectors.T >= threshold) & other).sum(axis=1)
        return accepted, other.sum(axis=1)
