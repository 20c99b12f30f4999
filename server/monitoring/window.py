"""A sliding window bounded by count and/or age, with an injectable clock for tests."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

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
