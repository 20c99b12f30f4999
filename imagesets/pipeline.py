"""Build steps every rendered set shares: parallel rendering, cleaning, the cache.

``glyphs`` and ``novel`` differ in fonts, characters and tenants; how they drop blank
renders, merge identical pictures and cache their arrays is one piece of code, so the
two sets are cleaned by the same rule.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from imagesets.base import ImageSet
from imagesets.rendering import is_blank

J = TypeVar("J")
R = TypeVar("R")


def parallel_map(fn: Callable[[J], R], jobs: Sequence[J], workers: int, desc: str) -> list[R]:
    """``[fn(j) for j in jobs]`` in order, over ``workers`` processes.

    The progress bar shows only on a terminal and not when silenced (contracts.progress:
    ``--no-progress`` of the command that needs the set): logs stay readable.
    """
    from contracts.progress import bar

    chunks = max(1, len(jobs) // (workers * 16))
    options = {"desc": desc, "unit": "class", "leave": False}
    if workers <= 1:
        return [fn(j) for j in bar(jobs, **options)]
    with ProcessPoolExecutor(workers) as pool:
        return list(bar(pool.map(fn, jobs, chunksize=chunks), total=len(jobs), **options))


@dataclass
class Distinct:
    """Classes that survived cleaning, each with the fonts that draw it, and why others left."""

    kept: dict[int, list[int]]
    dropped: dict[str, int] = field(
        default_factory=lambda: {"blank": 0, "few_fonts": 0, "duplicate": 0}
    )


def keep_distinct(
    candidates: Mapping[int, list[int]],
    clean: Mapping[int, list[np.ndarray]],
    min_fonts: int,
) -> Distinct:
    """Drop blank renders, classes with too few inked fonts, and duplicate pictures.

    ``clean[cp][j]`` is the clean render of codepoint ``cp`` in font ``candidates[cp][j]``.
    A (class, font) is kept only if it draws ink; a class only if at least ``min_fonts``
    fonts draw it and none of its renders is pixel-identical to an already kept class's
    render in the same font: Latin A, Greek Alpha and Cyrillic A are one picture, not
    three identities. Classes are visited in the mapping's order, so the first wins.
    """
    seen: set[tuple[int, bytes]] = set()
    out = Distinct(kept={})
    for cp, fonts in candidates.items():
        drawn = [(fi, img) for fi, img in zip(fonts, clean[cp], strict=True) if not is_blank(img)]
        if len(drawn) < min_fonts:
            out.dropped["blank" if len(drawn) < len(fonts) else "few_fonts"] += 1
            continue
        keys = [(fi, img.tobytes()) for fi, img in drawn]
        if any(k in seen for k in keys):
            out.dropped["duplicate"] += 1
            continue
        seen.update(keys)
        out.kept[cp] = [fi for fi, _ in drawn]
    return out


def class_imageset(
    name: str,
    rows: np.ndarray,
    sample_class: np.ndarray,
    class_names: Sequence[str],
    class_tenant: np.ndarray,
    tenant_names: Sequence[str],
    images: np.ndarray,
    extra: Mapping[str, np.ndarray],
) -> ImageSet:
    """An :class:`ImageSet` of some sample rows, with labels renumbered densely.

    Only the classes present in ``rows`` get a label, in their original order, so a
    split's labels index its own class names.
    """
    classes = np.unique(sample_class[rows])
    remap = np.full(len(class_names), -1, dtype=np.int64)
    remap[classes] = np.arange(len(classes))
    return ImageSet(
        name=name,
        labels=remap[sample_class[rows]],
        class_names=tuple(class_names[c] for c in classes),
        tenants=class_tenant[sample_class[rows]].astype(np.int64),
        tenant_names=tuple(tenant_names),
        pixels=images[rows],
        extra={k: v[rows] for k, v in extra.items()},
    )


def cache_dir() -> Path:
    """``$TCM_CACHE_DIR``, else ``$XDG_CACHE_HOME/tcm-retrieval``, else ``~/.cache/...``."""
    if env := os.environ.get("TCM_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tcm-retrieval"


def write_npz(path: Path, arrays: Mapping[str, np.ndarray], info: dict[str, Any]) -> None:
    """Compressed arrays plus a JSON ``info`` record, written atomically.

    Atomic because concurrent test workers may build the same cache entry: a reader
    sees either no file or a whole one.
    """
    from contracts.files import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays, info=np.array(json.dumps(info)))
    atomic_write_bytes(path, buffer.getvalue())
