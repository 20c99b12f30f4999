"""Progress bars: one switch for all of them, and none where nobody watches.

Every long step (rendering a dataset, embedding, counting pairs, exporting images)
draws its bar through :func:`bar`. A bar is drawn only when stderr is a terminal: in
a log or a pipe tqdm's carriage returns pile up into one unreadable line. And one
switch silences them all: ``--no-progress`` of any command calls :func:`silence`,
which sets ``TCM_NO_PROGRESS=1`` so that it also reaches the steps a command runs in
other processes (the demo's calibration, a dataset rendered in worker processes).
Setting ``TCM_NO_PROGRESS=1`` by hand does the same.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

ENV = "TCM_NO_PROGRESS"


def silence() -> None:
    """No progress bar from here on, in this process and the processes it starts."""
    os.environ[ENV] = "1"


def enabled(asked: bool = True) -> bool:
    """Whether a bar the caller ``asked`` for is drawn: not silenced, stderr a terminal."""
    if not asked or os.environ.get(ENV, "") not in ("", "0"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def bar(iterable: Iterable[Any] | None = None, *, asked: bool = True, **options: Any):
    """A tqdm on stderr, disabled unless :func:`enabled` (then it only passes items on)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not enabled(asked), file=sys.stderr, **options)
