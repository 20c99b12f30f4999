"""A progress bar over the blocks of all passes, or nothing when not asked for."""

from __future__ import annotations

from contracts import progress


class Ticker:
    """Counts processed blocks; shows a tqdm bar on stderr when ``enabled`` and the one
    switch of contracts.progress allows (a terminal, not silenced)."""

    def __init__(self, total: int, enabled: bool, desc: str = "counting pairs") -> None:
        self.bar = None
        if progress.enabled(enabled):
            self.bar = progress.bar(total=total, desc=desc, unit="block", leave=False)

    def grow(self, more: int) -> None:
        """Another sweep is needed (tail cache too big, or the cutoff was too high)."""
        if self.bar is not None:
            self.bar.total += more
            self.bar.refresh()

    def __call__(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
