"""Synthetic tenants whose impostor tails differ, for the normalisation tests."""

from __future__ import annotations

import numpy as np

from imagesets import EmbeddingSet


def tenants_with_tails(
    spreads: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8),
    classes: int = 48,
    per_class: int = 8,
    dim: int = 16,
    noise: float = 0.35,
    seed: int = 0,
) -> EmbeddingSet:
    """One tenant per spread: class centres ``spread`` apart around a tenant direction.

    A small spread crowds the tenant's classes together, so its impostor pairs score
    high (a heavy tail); a large one spreads them out (a light tail). One threshold
    then gives each tenant a very different FAR, which is what normalisation removes.
    """
    rng = np.random.default_rng(seed)
    xs, labels, tenants, names = [], [], [], []
    for k, spread in enumerate(spreads):
        base = rng.normal(size=dim)
        centres = base + spread * rng.normal(size=(classes, dim))
        lab = np.repeat(np.arange(classes), per_class)
        x = centres[lab] + noise * rng.normal(size=(len(lab), dim))
        xs.append(x)
        labels.append(lab + k * classes)
        tenants.append(np.full(len(lab), k))
        names += [f"t{k}c{c}" for c in range(classes)]
    x = np.concatenate(xs)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return EmbeddingSet(
        "tails",
        np.concatenate(labels),
        tuple(names),
        np.concatenate(tenants),
        tuple(f"tenant{k}" for k in range(len(spreads))),
        x.astype(np.float32),
    )


def save_npz(emb: EmbeddingSet, path) -> None:
    np.savez(
        path,
        embeddings=emb.embeddings,
        labels=np.array(emb.class_names)[emb.labels],
        tenants=np.array(emb.tenant_names)[emb.tenants],
    )
