"""Image sets as torch datasets, and m-per-class batches.

Images go through :func:`embedding.preprocess.preprocess` with the model's own
metadata, so training sees exactly the tensors the ONNX embedder will see at serving
time (same resize, scaling and normalisation).
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import DataLoader, Dataset

from contracts import EmbedderMeta
from embedding.preprocess import preprocess
from imagesets import ImageSet


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
