"""Validate embeddings and lay them out for the pair sweep.

Rows are reordered by (dataset, class) so that every class is one contiguous row
range: the genuine pairs of a block are then a few rectangles, found without a
per-element label comparison. Pairs never cross datasets (a tenant's query only
meets its own gallery), so each dataset is one contiguous range too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imagesets import EmbeddingSet

NORM_TOLERANCE = 1e-3


class CalibrationInputError(ValueError):
    """The embeddings cannot be calibrated; the message says what to fix."""


@dataclass(frozen=True)
class Prepared:
    """Embeddings sorted by (dataset, class) with the bookkeeping the engine needs."""

    x: np.ndarray  # (N, D) float32, rows sorted by (dataset, class)
    x32: np.ndarray  # the same array (the name says what the engine relies on)
    order: np.ndarray  # original position (in the concatenated input) of each sorted row
    cls: np.ndarray  # dense class id of each sorted row
    dataset_names: tuple[str, ...]
    ds_start: np.ndarray  # first row of each dataset
    ds_stop: np.ndarray
    class_names: tuple[str, ...]  # name of each dense class
    class_ds: np.ndarray  # dataset of each dense class
    class_start: np.ndarray  # first row of each dense class
    class_stop: np.ndarray

    @property
    def n_datasets(self) -> int:
        return len(self.dataset_names)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_size(self) -> np.ndarray:
        return self.class_stop - self.class_start

    def ds_rows(self, k: int) -> slice:
        return slice(int(self.ds_start[k]), int(self.ds_stop[k]))

    def ds_classes(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.class_ds == k)

    def ds_size(self, k: int) -> int:
        return int(self.ds_stop[k] - self.ds_start[k])

    def genuine_pairs(self, k: int) -> int:
        n = self.class_size[self.class_ds == k]
        return int((n * (n - 1) // 2).sum())

    def impostor_pairs(self, k: int) -> int:
        n = self.ds_size(k)
        return n * (n - 1) // 2 - self.genuine_pairs(k)

    def class_impostor_pairs(self) -> np.ndarray:
        """Impostor pairs with exactly one member in each class (inside its dataset)."""
        ds_n = (self.ds_stop - self.ds_start)[self.class_ds]
        return self.class_size * (ds_n - self.class_size)


def prepare(embeddings: EmbeddingSet | Sequence[EmbeddingSet]) -> Prepared:
    """Check and sort; one set means its tenants are the datasets, several sets are one each."""
    sets = [embeddings] if isinstance(embeddings, EmbeddingSet) else list(embeddings)
    if not sets:
        raise CalibrationInputError("no embeddings given: pass an EmbeddingSet or a list of them")
    x, ds_of, names, label_of, class_label = _gather(sets)
    _check_vectors(x)
    present, ds_new = np.unique(ds_of, return_inverse=True)  # tenants without rows drop out
    names = [names[d] for d in present]
    class_label = [class_label[d] for d in present]
    ds_of = ds_new.astype(np.int64)
    pairs = zip(ds_of, label_of, strict=True)
    keys = np.array([f"{names[d]}\x00{class_label[d][lab]}" for d, lab in pairs])
    order = np.lexsort((keys, ds_of))
    x = np.ascontiguousarray(x[order], dtype=np.float32)
    ds_of, keys = ds_of[order], keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    stops = np.r_[starts[1:], len(keys)]
    cls = np.repeat(np.arange(len(starts)), stops - starts)
    class_ds = ds_of[starts]
    ds_start = np.searchsorted(ds_of, np.arange(len(names)), side="left")
    ds_stop = np.searchsorted(ds_of, np.arange(len(names)), side="right")
    prep = Prepared(
        x=x,
        x32=x,
        order=order,
        cls=cls,
        dataset_names=tuple(names),
        ds_start=ds_start,
        ds_stop=ds_stop,
        class_names=tuple(k.split("\x00", 1)[1] for k in keys[starts]),
        class_ds=class_ds,
        class_start=starts,
        class_stop=stops,
    )
    _check_datasets(prep)
    return prep


def _gather(sets: list[EmbeddingSet]):
    """Concatenate; datasets are the tenants of one set, or the sets themselves."""
    single = len(sets) == 1
    xs, ds_parts, labels, class_label, names = [], [], [], [], []
    for s in sets:
        emb = np.asarray(s.embeddings)
        if emb.ndim != 2 or len(emb) != len(s.labels):
            raise CalibrationInputError(
                f"{s.name}: {len(s.labels)} labels but embeddings of shape {emb.shape}"
            )
        if single:
            ds_parts.append(np.asarray(s.tenants, dtype=np.int64))
            names.extend(s.tenant_names)
            class_label.extend([s.class_names] * len(s.tenant_names))
        else:
            ds_parts.append(np.full(len(s.labels), len(names), dtype=np.int64))
            names.append(s.name)
            class_label.append(s.class_names)
        xs.append(emb)
        labels.append(np.asarray(s.labels, dtype=np.int64))
    if len(set(names)) != len(names):
        raise CalibrationInputError(f"dataset names repeat: {names}; give each set its own name")
    dims = {x.shape[1] for x in xs}
    if len(dims) != 1:
        raise CalibrationInputError(f"embedding sets have different dimensions {sorted(dims)}")
    return (
        np.concatenate(xs).astype(np.float64),
        np.concatenate(ds_parts),
        names,
        np.concatenate(labels),
        class_label,
    )


def _check_vectors(x: np.ndarray) -> None:
    if len(x) < 2:
        raise CalibrationInputError(f"need at least 2 embeddings, got {len(x)}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise CalibrationInputError(
            f"{int(bad.sum())} embeddings contain NaN or infinity (first at row "
            f"{int(np.flatnonzero(bad)[0])}); fix the model or drop those images"
        )
    norms = np.linalg.norm(x, axis=1)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise CalibrationInputError(
            f"{int(off.sum())} embeddings are not L2-normalised (row {i} has norm {norms[i]:.4g}); "
            "calibration compares cosine similarities: normalise the embeddings (zero vectors "
            "cannot be normalised and must be dropped)"
        )


def _check_datasets(prep: Prepared) -> None:
    for k, name in enumerate(prep.dataset_names):
        sizes = prep.class_size[prep.class_ds == k]
        if len(sizes) < 2:
            raise CalibrationInputError(
                f"dataset {name!r} has {len(sizes)} class(es): FAR needs pairs of different "
                "classes, so each dataset needs at least 2 classes"
            )
        if (sizes >= 2).sum() == 0:
            raise CalibrationInputError(
                f"dataset {name!r} has no class with 2 or more images, so no genuine pairs: "
                "TAR cannot be measured"
            )
