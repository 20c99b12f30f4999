"""The blocked pass over all unordered pairs of one dataset.

Each block of scores is computed by one matrix product and handed to a visitor, so
no more than ``block * block`` scores exist at a time. A score is defined as the
float64 inner product of the two embeddings rounded to float32: float32 GEMM gives
results that depend on the block shape (different kernels, different summation
order), which would make thresholds depend on the block size; the float64 sum
rounded once does not (up to a double rounding within ~1e-14 of a float32 midpoint).

In every block handed to a visitor, the pairs a visitor must ignore are set to
``-inf``: the lower triangle and diagonal of diagonal blocks (each unordered pair is
visited once) and the genuine pairs (same class). Genuine pairs are handed over
separately, once, when ``collect_genuine`` is set; rows are sorted by class, so they
are a few rectangles per block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from calibrate.prepare import Prepared

DEFAULT_BLOCK = 2048


@dataclass
class Block:
    """Scores of rows ``i0:i0+len`` against rows ``j0:j0+len`` of one dataset."""

    dataset: int
    i0: int
    j0: int
    scores: np.ndarray  # float32, ignored pairs at -inf


@dataclass
class Genuine:
    """All genuine pairs (i < j, sorted row indices) with their scores."""

    rows: np.ndarray
    cols: np.ndarray
    scores: np.ndarray  # float32


ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def scores_cpu(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 GEMM rounded to float32: the same value for a pair whatever the block shape."""
    return (a @ b.T).astype(np.float32)


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
) -> Genuine | None:
    """Visit every block of every dataset; return the genuine pairs when asked."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for k in range(prep.n_datasets):
        for i0, i1, j0, j1 in blocks(prep, k, block):
            s = score_fn(prep.x[i0:i1], prep.x[j0:j1])
            _mask_genuine(prep, s, i0, i1, j0, j1, found if collect_genuine else None)
            if i0 == j0:
                s[np.tril_indices(i1 - i0)] = -np.inf
            visit(Block(k, i0, j0, s))
            if tick is not None:
                tick()
    if not collect_genuine:
        return None
    if not found:
        empty = np.zeros(0, np.int64)
        return Genuine(empty, empty, np.zeros(0, np.float32))
    rows, cols, vals = (np.concatenate(p) for p in zip(*found, strict=True))
    return Genuine(rows, cols, vals)


def _mask_genuine(
    prep: Prepared,
    s: np.ndarray,
    i0: int,
    i1: int,
    j0: int,
    j1: int,
    found: list | None,
) -> None:
    """Set same-class scores to -inf, collecting each genuine pair (i < j) once."""
    first = np.searchsorted(prep.class_stop, max(i0, j0), side="right")
    last = np.searchsorted(prep.class_start, min(i1, j1), side="left")
    for c in range(first, last):
        a0, a1 = max(prep.class_start[c], i0), min(prep.class_stop[c], i1)
        b0, b1 = max(prep.class_start[c], j0), min(prep.class_stop[c], j1)
        if a0 >= a1 or b0 >= b1:
            continue
        sub = s[a0 - i0 : a1 - i0, b0 - j0 : b1 - j0]
        if found is not None:
            r, q = np.meshgrid(np.arange(a0, a1), np.arange(b0, b1), indexing="ij")
            keep = r < q
            found.append((r[keep], q[keep], sub[keep].copy()))
        sub[...] = -np.inf
