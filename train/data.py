"""Datasets by name (``DATASETS``), torch views of image sets, and m-per-class batches.

Images go through :func:`embedding.preprocess.preprocess` with the model's own
metadata, so training sees exactly the tensors the ONNX embedder will see at serving
time (same resize, scaling and normalisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import DataLoader, Dataset

from contracts import EmbedderMeta
from embedding.preprocess import preprocess
from imagesets import ImageSet, load_images
from imagesets.benchmarks import LOADERS
from imagesets.folders import load_folder
from train.registry import DATASETS, split_spec


@DATASETS.register("glyphs")
def glyphs(split: str) -> ImageSet:
    """The embedded glyph set (3,396 characters, 8 script tenants), rendered once locally."""
    return load_images("glyphs", split)


@DATASETS.register("glyphs-tiny")
def glyphs_tiny(split: str) -> ImageSet:
    """At most 6 glyph classes per split and tenant: smoke runs and tests."""
    return load_images("glyphs-tiny", split)


@DATASETS.register("folder")
def folder(split: str, path: str) -> ImageSet:
    """folder:PATH, root/<label>/<image> or root/<tenant>/<label>/<image> (no split: all)."""
    return load_folder(path)


BENCHMARKS = {
    "cub": "CUB-200-2011",
    "cars": "Cars-196",
    "sop": "Stanford Online Products",
    "inshop": "In-Shop Clothes Retrieval",
}


def _benchmark(kind: str):
    def load(split: str, path: str) -> ImageSet:
        return LOADERS[kind](path, split)

    load.__doc__ = f"{kind}:PATH, {BENCHMARKS.get(kind, kind)} in its published layout"
    return load


for _kind in sorted(LOADERS):
    DATASETS.register(_kind)(_benchmark(_kind))


def load_dataset(spec: str, split: str) -> ImageSet:
    """A split of the dataset a spec names: ``glyphs``, ``cub:PATH``, or an image folder."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    name, path = split_spec(spec)
    if path and name in DATASETS:
        return DATASETS.create(name, split, path)
    if not path and spec not in DATASETS and Path(spec).is_dir():
        return DATASETS.create("folder", split, spec)
    return DATASETS.create(spec, split)


def hold_out_classes(images: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, validation): whole classes, ``fraction`` of them, drawn per tenant.

    Validation classes are never trained on, so the validation set is open-world like
    the test split. Each tenant with at least 4 classes gives at least 2 (FAR needs
    impostor pairs within a tenant) and keeps at least 2 for training; smaller tenants
    stay whole in training. The draw uses its own ``seed``, not the run's, so every run
    of a comparison holds out the same classes.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = [np.zeros(0, dtype=images.labels.dtype)]
    for tenant in np.unique(images.tenants):
        classes = np.unique(images.labels[images.tenants == tenant])
        if len(classes) < 4:
            continue
        n = min(max(2, round(fraction * len(classes))), len(classes) - 2)
        held.append(rng.choice(classes, size=n, replace=False))
    is_val = np.isin(images.labels, np.concatenate(held))
    if not is_val.any():
        raise ValueError(f"{images.name}: too few classes per tenant to hold any out (need 4)")
    return (
        images.subset(np.flatnonzero(~is_val), name=f"{images.name}-fit"),
        images.subset(np.flatnonzero(is_val), name=f"{images.name}-val"),
    )


class ImageDataset(Dataset):
    """(image tensor, label) pairs; tensors are preprocessed per item."""

    def __init__(self, images: ImageSet, meta: EmbedderMeta) -> None:
        self.images = images
        self.meta = meta
        self.labels = torch.as_tensor(images.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = preprocess([self.images.image(int(i))], self.meta)[0]
        return torch.from_numpy(x), self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch at once: in-memory pixels take preprocess's vectorised path."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.images.pixels is not None:
            x = preprocess(self.images.pixels[idx], self.meta)
        else:
            x = preprocess([self.images.image(int(i)) for i in idx], self.meta)
        xs = torch.from_numpy(x)
        return list(zip(xs, self.labels[idx], strict=True))


def train_loader(
    images: ImageSet,
    meta: EmbedderMeta,
    batch_size: int,
    m_per_class: int,
    steps: int,
    workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    """Batches of ``batch_size // m`` classes with ``m`` images each (PML's MPerClassSampler).

    Every batch then has genuine pairs for TCM's positive term and for the base loss.
    """
    if batch_size % m_per_class:
        raise ValueError(f"batch_size {batch_size} must be a multiple of m_per_class {m_per_class}")
    classes = len(np.unique(images.labels))
    if classes < batch_size // m_per_class:
        raise ValueError(
            f"{images.name}: {classes} classes cannot fill a batch of {batch_size // m_per_class} "
            f"classes x {m_per_class}; lower --batch-size"
        )
    torch.manual_seed(seed)  # MPerClassSampler draws from torch's global generator
    sampler = MPerClassSampler(
        images.labels, m_per_class, batch_size=batch_size, length_before_new_iter=steps * batch_size
    )
    return DataLoader(
        ImageDataset(images, meta),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def eval_loader(images: ImageSet, meta: EmbedderMeta, batch_size: int = 512) -> DataLoader:
    return DataLoader(ImageDataset(images, meta), batch_size=batch_size, shuffle=False)


def class_subset(images: ImageSet, limit: int, seed: int = 0) -> ImageSet:
    """Whole classes drawn at random until ``limit`` images (0: everything).

    Whole classes keep every genuine pair of the chosen classes, so per-class utility
    curves stay meaningful on a smaller, faster evaluation set.
    """
    if limit <= 0 or len(images) <= limit:
        return images
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(images.labels, return_counts=True)
    order = rng.permutation(len(classes))
    keep = order[np.cumsum(counts[order]) <= limit]
    rows = np.flatnonzero(np.isin(images.labels, classes[keep]))
    return images.subset(rows)
