"""Labelled image folders: ``root/<label>/<image>`` or ``root/<tenant>/<label>/<image>``.

The depth of the images decides the layout, so a user never passes a flag for it;
mixing depths is refused because it would silently turn tenants into labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imagesets.base import ImageSet, encode, is_image_file


def load_folder(root: str | Path, name: str | None = None) -> ImageSet:
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder not found: {base}")
    files = sorted(p for p in base.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise ValueError(f"{base}: no images found (expected root/<label>/<image>)")
    depths = {len(p.relative_to(base).parts) for p in files}
    if depths not in ({2}, {3}):
        raise ValueError(
            f"{base}: images must all sit at root/<label>/<image> or all at "
            f"root/<tenant>/<label>/<image>; found depths {sorted(depths)}"
        )
    parts = [p.relative_to(base).parts for p in files]
    if depths == {3}:
        tenants, tenant_names = encode([q[0] for q in parts])
        # The same label name in two tenants is two identities.
        labels, class_names = encode([f"{q[0]}/{q[1]}" for q in parts])
    else:
        labels, class_names = encode([q[0] for q in parts])
        tenants, tenant_names = np.zeros(len(files), np.int64), (base.name,)
    return ImageSet(
        name=name or base.name,
        labels=labels,
        class_names=class_names,
        tenants=tenants,
        tenant_names=tenant_names,
        paths=tuple(str(p) for p in files),
    )
