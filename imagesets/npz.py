"""Precomputed embeddings in ``.npz``: ``embeddings`` (N, D), ``labels`` (N,), optional
``tenants`` (N,). Labels and tenants may be integers or strings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imagesets.base import EmbeddingSet, encode, single_tenant


def load_npz(path: str | Path, name: str | None = None) -> EmbeddingSet:
    file = Path(path)
    try:
        archive = np.load(file, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"embeddings file not found: {file}") from None
    except Exception as err:
        raise ValueError(f"{file}: not a readable .npz archive ({err})") from err
    with archive as z:
        missing = {"embeddings", "labels"} - set(z.files)
        if missing:
            raise ValueError(f"{file}: missing arrays {sorted(missing)} (have {z.files})")
        emb = np.asarray(z["embeddings"], dtype=np.float32)
        raw_labels = z["labels"]
        raw_tenants = z["tenants"] if "tenants" in z.files else None
    if emb.ndim != 2:
        raise ValueError(f"{file}: embeddings must be 2-D (N, D), got shape {emb.shape}")
    if len(raw_labels) != len(emb):
        raise ValueError(f"{file}: {len(emb)} embeddings but {len(raw_labels)} labels")
    labels, class_names = encode([str(v) for v in raw_labels])
    if raw_tenants is None:
        tenants, tenant_names = single_tenant(len(emb), name or file.stem)
    else:
        if len(raw_tenants) != len(emb):
            raise ValueError(f"{file}: {len(emb)} embeddings but {len(raw_tenants)} tenants")
        tenants, tenant_names = encode([str(v) for v in raw_tenants])
        # Same label in two tenants = two identities, as for folders.
        labels, class_names = encode(
            [f"{t}/{v}" for t, v in zip(raw_tenants, raw_labels, strict=True)]
        )
    return EmbeddingSet(
        name=name or file.stem,
        labels=labels,
        class_names=class_names,
        tenants=tenants,
        tenant_names=tenant_names,
        embeddings=emb,
    )
