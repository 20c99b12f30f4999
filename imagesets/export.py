"""Write a labelled image set as ``DIR/<tenant>/<label>/<n>.png`` folders.

That layout is what ``python -m client enroll TENANT DIR/<tenant>`` reads (a file's
label is its parent folder's name) and what :func:`imagesets.load_images` reads
back as a folder set, so any dataset spec becomes a gallery or query set on disk.

Folder names must be safe file names, yet class names such as ``U+002F /`` or
``U+0386 Ά`` hold path separators, spaces and non-ASCII letters. :func:`safe_name`
keeps a name readable and escapes only what a file system cannot hold or would alter:
each such character becomes ``%XX`` per UTF-8 byte, like a URL. Because ``%`` itself is
escaped, the mapping is one-to-one and :func:`unescape` returns the class name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imagesets.base import ImageSet

# Escaped wherever they occur: the escape character, path separators and the
# characters Windows refuses in a file name. Non-printable characters (controls,
# format characters such as bidi marks, line/paragraph separators, non-ASCII spaces)
# are escaped too: invisible in a listing, they would make two folders look alike.
_ALWAYS = frozenset('%/\\<>:"|?*')
_MAX_BYTES = 255  # a file name's limit on common file systems
_ESCAPED_RUN = re.compile(r"((?:%[0-9A-F]{2})+)")


def _must_escape(char: str) -> bool:
    return char in _ALWAYS or (char != " " and not char.isprintable())


def _percent(char: str) -> str:
    return "".join(f"%{b:02X}" for b in char.encode("utf-8"))


def safe_name(name: str) -> str:
    """A readable, reversible file name for ``name`` (see the module docstring).

    Also escaped: a trailing space or dot (Windows drops them) and the names ``.`` and
    ``..``. Raises ValueError for an empty name or one longer than 255 bytes escaped.
    """
    if not name:
        raise ValueError("cannot make a file name of an empty label")
    chars = [_percent(c) if _must_escape(c) else c for c in name]
    if name in (".", ".."):
        chars = [_percent(c) for c in name]
    elif name[-1] in " .":
        chars[-1] = _percent(name[-1])
    out = "".join(chars)
    if len(out.encode("utf-8")) > _MAX_BYTES:
        raise ValueError(f"label {name!r} is longer than {_MAX_BYTES} bytes as a file name")
    return out


def unescape(folder: str) -> str:
    """The label that :func:`safe_name` turned into ``folder``."""
    parts = _ESCAPED_RUN.split(folder)  # odd items: runs of %XX, one or more characters
    return "".join(
        bytes.fromhex(part.replace("%", "")).decode("utf-8") if i % 2 else part
        for i, part in enumerate(parts)
    )


class ExportError(Exception):
    """A request that cannot be carried out (the CLI turns it into a message and exit code)."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: per tenant, its classes and images."""

    root: Path
    tenants: dict[str, tuple[int, int]]  # tenant -> (classes, images)

    @property
    def images(self) -> int:
        return sum(n for _, n in self.tenants.values())


def pick_classes(images: ImageSet, tenant: int, limit: int | None, seed: int) -> list[int]:
    """Labels of one tenant to export: all, or a seeded sample of ``limit``, in label order.

    A sample rather than the first ``limit`` labels, because class names sort by
    codepoint and the first ones of a tenant are alike (the digits of latin).
    """
    labels = np.unique(images.labels[images.tenants == tenant])
    if limit is not None and limit < len(labels):
        rng = np.random.default_rng([seed, tenant])
        labels = np.sort(rng.choice(labels, size=limit, replace=False))
    return [int(label) for label in labels]


def label_folder(images: ImageSet, label: int, tenant: str) -> str:
    """The folder name of a class: its name, without the ``tenant/`` prefix a folder
    set adds, made safe. Re-exporting an exported folder gives the same names."""
    name = images.class_names[label]
    prefix = f"{tenant}/"
    return safe_name(name[len(prefix) :] if name.startswith(prefix) else name)


def export(
    images: ImageSet,
    out: Path,
    tenants: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: Callable[[Iterable[int], int], Iterable[int]] | None = None,
    per_class: int | None = None,
    skip: int = 0,
) -> Exported:
    """Write ``images`` under ``out/<tenant>/<label>/<n>.png``; ``out`` must not exist
    or be empty unless the caller decided otherwise (the CLI's ``--force``).

    ``n`` counts a class's images in dataset order, zero-padded to one width per export
    so that sorted file names keep that order; ``skip`` leaves out each class's first
    images and ``per_class`` keeps at most that many of the rest (``n`` still counts from
    the class's first image, so a gallery exported with ``per_class`` and queries
    exported with ``skip`` never share a file name or an image). ``progress`` wraps the
    row iterator (a tqdm, say) and gets the row count.
    """
    if limit is not None and limit < 1:
        raise ExportError(f"--limit must be at least 1, got {limit}")
    if per_class is not None and per_class < 1:
        raise ExportError(f"--per-class must be at least 1, got {per_class}")
    if skip < 0:
        raise ExportError(f"--skip must be at least 0, got {skip}")
    chosen = _tenants(images, tenants)
    plan = {t: pick_classes(images, images.tenant_names.index(t), limit, seed) for t in chosen}
    rows = np.concatenate(
        [np.flatnonzero(np.isin(images.labels, labels)) for labels in plan.values()]
        or [np.zeros(0, np.int64)]
    )
    width = len(str(max(np.bincount(images.labels[rows]).max(initial=1) - 1, 0)))
    position = _position_in_class(images.labels[rows])
    keep = position >= skip
    if per_class is not None:
        keep &= position < skip + per_class
    rows, position = rows[keep], position[keep]
    folders = {
        label: out / safe_name(t) / label_folder(images, label, t)
        for t, labels in plan.items()
        for label in labels
    }
    for label in set(images.labels[rows].tolist()):
        folders[label].mkdir(parents=True, exist_ok=True)
    numbered = dict(zip(rows.tolist(), position.tolist(), strict=True))
    for i in progress(rows, len(rows)) if progress else rows:
        label = int(images.labels[i])
        _save(images.image(int(i)), folders[label] / f"{numbered[int(i)]:0{width}d}.png")
    written = images.labels[rows]
    return Exported(
        out,
        {
            t: (int(np.isin(labels, written).sum()), int(np.isin(written, labels).sum()))
            for t, labels in plan.items()
        },
    )


def _position_in_class(labels: np.ndarray) -> np.ndarray:
    """For each row, how many rows of its class come before it (0 for the first)."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    counts = np.diff(np.r_[starts, len(labels)])
    ranks = np.arange(len(labels)) - np.repeat(starts, counts)
    position = np.empty(len(labels), np.int64)
    position[order] = ranks
    return position


def _tenants(images: ImageSet, wanted: Sequence[str] | None) -> list[str]:
    """The tenants to write, in the set's order; unknown names are an error, not a skip."""
    present = [t for i, t in enumerate(images.tenant_names) if (images.tenants == i).any()]
    if not wanted:
        return present
    unknown = [t for t in wanted if t not in present]
    if unknown:
        raise ExportError(
            f"{images.name} has no tenant {', '.join(map(repr, unknown))}; "
            f"its tenants are {', '.join(present)}"
        )
    return [t for t in present if t in wanted]


def _save(pixels: np.ndarray, path: Path) -> None:
    """Lossless PNG, grayscale or RGB as the set stores it."""
    Image.fromarray(pixels).save(path, format="PNG")
