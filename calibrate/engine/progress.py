"""A progress bar over the blocks of all passes, or nothing when not asked for."""

from __future__ import annotations


class Ticker:
    """Counts processed blocks; shows a tqdm bar when ``enabled`` (stderr)."""

    def __init__(self, total: int, enabled: bool, desc: str = "counting pairs") -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="block", leave=False)

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
