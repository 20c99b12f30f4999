"""The blocked pass over all unordered pairs of one dataset.

A pair's score is defined as the float64 inner product of the two float32
embeddings, rounded once to float32. That value does not depend on how pairs are
grouped into blocks (float32 GEMM results do: kernels and summation order change
with the block shape), so thresholds do not depend on the block size and equal
those of a dense implementation (up to a double rounding within ~1e-14 of a
float32 midpoint).

Each block is first computed with one fast float32 GEMM. Its error is bounded
(``margin``), so a visitor that needs scores at or above ``t`` asks the block for
them: only entries within ``margin`` of ``t`` or above are recomputed exactly. With
thresholds in the top tail of the scores that is a small share of the block.

In every block, pairs a visitor must ignore are at ``-inf``: the lower triangle and
diagonal of diagonal blocks (each unordered pair is visited once) and the genuine
pairs (same class), which ``sweep`` hands over separately, once, when asked. Rows
are sorted by class, so the genuine pairs of a block are a few rectangles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from calibrate.engine.prepare import NORM_TOLERANCE, Prepared

if TYPE_CHECKING:
    from calibrate.engine.distributed import Sharding

DEFAULT_BLOCK = 2048
EXACT_CHUNK = 1 << 15  # pairs recomputed per gather: bounds the gather's memory

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def margin(dim: int) -> float:
    """A bound on |float32 GEMM score - exact score| for rows of norm <= 1 + tolerance.

    Summing D products in float32 errs by at most gamma_D * sum|x_i y_i| with
    gamma_D = D u / (1 - D u), u = 2^-24; doubled, plus the final rounding.
    """
    u = 2.0**-24
    gamma = dim * u / (1 - dim * u)
    return 2 * gamma * (1 + NORM_TOLERANCE) ** 2 + 1e-7


def nonzero2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero for a 2-D mask, several times faster for sparse masks (one flat scan)."""
    flat = np.flatnonzero(mask)
    return np.divmod(flat, mask.shape[1])


def tolerance(dim: int, score_fn: ScoreFn) -> float:
    """The error bound to use for a score function: ``margin``, or its own larger one.

    A GPU GEMM may use reduced-precision tensor cores (TF32); such a function
    declares a ``min_margin`` and the engine refines more scores exactly.
    """
    return max(margin(dim), float(getattr(score_fn, "min_margin", 0.0)))


def exact_scores(x32: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The defining score of pairs (rows[i], cols[i]): float64 dot rounded to float32.

    float32 rows are gathered (half the memory traffic of float64) and multiplied
    and summed in float64: each product of two float32 numbers is exact in float64.
    """
    out = np.empty(len(rows), np.float32)
    for s in range(0, len(rows), EXACT_CHUNK):
        a, b = x32[rows[s : s + EXACT_CHUNK]], x32[cols[s : s + EXACT_CHUNK]]
        out[s : s + EXACT_CHUNK] = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    return out


@dataclass
class Block:
    """Approximate scores of rows ``i0:i0+h`` against rows ``j0:j0+w`` of one dataset."""

    dataset: int
    i0: int
    j0: int
    scores: np.ndarray  # float32 GEMM, ignored pairs at -inf
    x32: np.ndarray  # rows of the whole set, for exact recomputation
    margin: float

    def exact(self, r: np.ndarray, q: np.ndarray) -> np.ndarray:
        return exact_scores(self.x32, r + self.i0, q + self.j0)

    def above(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(local rows, local cols, exact scores) of the pairs with exact score >= t."""
        r, q = nonzero2d(self.scores >= t - self.margin)
        v = self.exact(r, q)
        keep = v >= t
        return r[keep], q[keep], v[keep]

    def best(self, axis: int, below: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
        """(global index, exact score) of candidates for each row's (axis=1) or column's max.

        Only rows (columns) whose approximate max is under ``below`` are searched:
        a caller that already has every exact score >= ``below - margin`` knows the
        others' max.
        """
        top = self.scores.max(axis=axis)
        need = np.flatnonzero(np.isfinite(top) & (top < below))
        if not len(need):
            return need, np.zeros(0, np.float32)
        lim = top[need] - self.margin
        if axis == 1:
            r, q = nonzero2d(self.scores[need] >= lim[:, None])
            r = need[r]
        else:
            r, q = nonzero2d(self.scores[:, need] >= lim[None, :])
            q = need[q]
        v = self.exact(r, q)
        return (r + self.i0, v) if axis == 1 else (q + self.j0, v)


@dataclass
class Genuine:
    """All genuine pairs (i < j, sorted row indices) with their exact scores."""

    rows: np.ndarray
    cols: np.ndarray
    scores: np.ndarray  # float32


def scores_cpu(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 GEMM of two row blocks (approximate scores, within ``margin``)."""
    return a @ b.T


def blocks(prep: Prepared, k: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """Upper-triangular block coordinates (i0, i1, j0, j1) of dataset ``k``."""
    lo, hi = int(prep.ds_start[k]), int(prep.ds_stop[k])
    for i0 in range(lo, hi, block):
        for j0 in range(i0, hi, block):
            yield i0, min(i0 + block, hi), j0, min(j0 + block, hi)


def n_blocks(prep: Prepared, block: int) -> int:
    total = 0
    for k in range(prep.n_datasets):
        m = -(-prep.ds_size(k) // block)
        total += m * (m + 1) // 2
    return total


def sweep(
    prep: Prepared,
    visit: Callable[[Block], None],
    *,
    block: int = DEFAULT_BLOCK,
    score_fn: ScoreFn = scores_cpu,
    collect_genuine: bool = False,
    tick: Callable[[], None] | None = None,
    shard: Sharding | None = None,
) -> Genuine | None:
    """Visit every block of every dataset; return the genuine pairs when asked.

    With ``shard``, only the blocks this process owns are scored and visited; the
    genuine pairs (found from the class layout alone, no scores needed) are still
    collected from every block, so each process returns all of them, in order.
    """
    found: list[tuple[np.ndarray, np.ndarray]] = []
    tol = tolerance(prep.x.shape[1], score_fn)
    index = -1
    for k in range(prep.n_datasets):
        for i0, i1, j0, j1 in blocks(prep, k, block):
            index += 1
            if shard is not None and not shard.owns(index):
                if collect_genuine:
                    _mask_genuine(prep, None, i0, i1, j0, j1, found)
                if tick is not None:
                    tick()
                continue
            s = np.asarray(score_fn(prep.x32[i0:i1], prep.x32[j0:j1]), dtype=np.float32)
            _mask_genuine(prep, s, i0, i1, j0, j1, found if collect_genuine else None)
            if i0 == j0:
                s[_lower(i1 - i0)] = -np.inf
            visit(Block(k, i0, j0, s, prep.x32, tol))
            if tick is not None:
                tick()
    if not collect_genuine:
        return None
    empty = np.zeros(0, np.int64)
    rows = np.concatenate([r for r, _ in found]) if found else empty
    cols = np.concatenate([q for _, q in found]) if found else empty
    return Genuine(rows, cols, exact_scores(prep.x32, rows, cols))


@functools.lru_cache(maxsize=256)
def _upper_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def _pairs_in(a0: int, a1: int, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, with i in [a0, a1) and j in [b0, b1)."""
    if a0 == b0 and a1 == b1:  # a whole class inside one diagonal block: the common case
        r, q = _upper_pairs(a1 - a0)
        return r + a0, q + a0
    r, q = np.meshgrid(np.arange(a0, a1), np.arange(b0, b1), indexing="ij")
    keep = r < q
    return r[keep], q[keep]


@functools.lru_cache(maxsize=4)
def _lower(n: int) -> np.ndarray:
    """Boolean mask of the diagonal and lower triangle of an n x n block."""
    return np.tri(n, dtype=bool)


def _mask_genuine(
    prep: Prepared,
    s: np.ndarray | None,
    i0: int,
    i1: int,
    j0: int,
    j1: int,
    found: list | None,
) -> None:
    """Set same-class scores to -inf (unless ``s`` is None), collecting each genuine pair once."""
    first = np.searchsorted(prep.class_stop, max(i0, j0), side="right")
    last = np.searchsorted(prep.class_start, min(i1, j1), side="left")
    for c in range(first, last):
        a0, a1 = max(prep.class_start[c], i0), min(prep.class_stop[c], i1)
        b0, b1 = max(prep.class_start[c], j0), min(prep.class_stop[c], j1)
        if a0 >= a1 or b0 >= b1:
            continue
        if found is not None:
            found.append(_pairs_in(a0, a1, b0, b1))
        if s is not None:
            s[a0 - i0 : a1 - i0, b0 - j0 : b1 - j0] = -np.inf
