"""Sliding windows bounded by count and/or age, with an injectable clock for tests."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


class SlidingWindow(Generic[T]):
    """Keeps the last ``max_items`` entries that are younger than ``max_age`` seconds.

    An entry recorded at time r is kept while ``now - r < max_age``: an entry exactly
    ``max_age`` old has left the window. Either bound may be None, not both.
    """

    def __init__(
        self, max_items: int | None, max_age: float | None, clock: Callable[[], float]
    ) -> None:
        validate_window(max_items, max_age)
        self._items: deque[tuple[float, T]] = deque(maxlen=max_items)
        self._max_age = max_age
        self._clock = clock

    def append(self, item: T) -> T | None:
        """Adds ``item`` now; returns the entry pushed out by the count bound, if any."""
        self.expire()
        dropped = None
        if self._items.maxlen is not None and len(self._items) == self._items.maxlen:
            dropped = self._items[0][1]
        self._items.append((self._clock(), item))
        return dropped

    def expire(self) -> list[T]:
        """Drops the entries that are too old; returns them (oldest first)."""
        if self._max_age is None:
            return []
        cutoff = self._clock() - self._max_age
        gone = []
        while self._items and self._items[0][0] <= cutoff:
            gone.append(self._items.popleft()[1])
        return gone

    def keep(self, wanted: Callable[[T], bool]) -> list[T]:
        """Keeps the entries for which ``wanted`` is true (times unchanged); returns the rest."""
        kept = [(t, item) for t, item in self._items if wanted(item)]
        gone = [item for _, item in self._items if not wanted(item)]
        self._items.clear()
        self._items.extend(kept)
        return gone

    def __iter__(self) -> Iterator[T]:
        return (item for _, item in self._items)

    def __len__(self) -> int:
        return len(self._items)


def validate_window(max_items: int | None, max_age: float | None) -> None:
    """Rejects windows that would keep nothing or everything forever."""
    if max_items is None and max_age is None:
        raise ValueError("a window needs window_decisions, window_seconds or both")
    if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
        raise ValueError(f"window_decisions must be a positive integer, got {max_items!r}")
    if max_age is not None and not (max_age > 0 and math.isfinite(max_age)):
        raise ValueError(f"window_seconds must be a positive number, got {max_age!r}")


class RowWindow:
    """The same window for fixed-width rows of floats, in a numpy ring buffer.

    A LiveMonitor keeps one decision window per (tenant label, target FAR): with a
    thousand tenants and full windows, a deque of Python objects costs about 200 bytes
    per decision and a scrape must walk every one; here a row costs 8 bytes per column
    plus its timestamp, and sums are vectorised. The buffer starts small and doubles up
    to ``max_items`` (a tenant with three decisions holds three rows, not a thousand).
    """

    def __init__(
        self,
        columns: int,
        max_items: int | None,
        max_age: float | None,
        clock: Callable[[], float],
        initial: int = 8,
    ) -> None:
        validate_window(max_items, max_age)
        size = initial if max_items is None else min(initial, max_items)
        self._rows = np.empty((size, columns), np.float64)
        self._times = np.empty(size, np.float64)
        self._start = 0  # ring index of the oldest row
        self._count = 0
        self._max_items = max_items
        self._max_age = max_age
        self._clock = clock

    def append(self, row: Sequence[float]) -> None:
        """Adds ``row`` now; the oldest row goes when the count bound is reached."""
        self.expire()
        if self._count == len(self._times):
            if self._max_items is not None and self._count >= self._max_items:
                self._start = (self._start + 1) % self._count  # overwrite the oldest
                self._count -= 1
            else:
                self._grow()
        end = (self._start + self._count) % len(self._times)
        self._rows[end] = row
        self._times[end] = self._clock()
        self._count += 1

    def expire(self) -> None:
        """Drops the rows that are too old (an entry exactly ``max_age`` old is out)."""
        if self._max_age is None or self._count == 0:
            return
        times = self._ordered(self._times)
        gone = int(np.searchsorted(times, self._clock() - self._max_age, side="right"))
        self._start = (self._start + gone) % len(self._times)
        self._count -= gone

    def values(self) -> np.ndarray:
        """The rows in the window, oldest first: a (n, columns) copy."""
        return self._ordered(self._rows)

    def keep(self, mask: np.ndarray) -> None:
        """Keeps only the rows where ``mask`` (over :meth:`values`) is true."""
        rows, times = self.values()[mask], self._ordered(self._times)[mask]
        self._rows[: len(rows)], self._times[: len(rows)] = rows, times
        self._start, self._count = 0, len(rows)

    def _ordered(self, data: np.ndarray) -> np.ndarray:
        end = self._start + self._count
        if end <= len(data):
            return data[self._start : end].copy()
        return np.concatenate([data[self._start :], data[: end - len(data)]])

    def _grow(self) -> None:
        size = len(self._times) * 2
        if self._max_items is not None:
            size = min(size, self._max_items)
        rows, times = self.values(), self._ordered(self._times)
        self._rows = np.empty((size, rows.shape[1]), np.float64)
        self._times = np.empty(size, np.float64)
        self._rows[: len(rows)], self._times[: len(rows)] = rows, times
        self._start = 0

    def __len__(self) -> int:
        return self._count
