"""Which glyph images each demo tenant enrols and which it sends as queries.

Per tenant, some test classes are enrolled (a few gallery images each, so the tenant
has enough gallery pairs for its score normalisation to become active); genuine
queries are other images of enrolled classes, impostor queries are images of classes
the tenant never enrolled. The classes come from the held-out test split, so the
embedder has never seen any of them (open world), and the choice is seeded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from imagesets import ImageSet

ENROL_SHARE = 0.6  # at most this share of a tenant's classes is enrolled


@dataclass
class Query:
    index: int  # row in the image set
    label: str
    genuine: bool  # the query's class is enrolled in this tenant


@dataclass
class TenantPlan:
    tenant: str
    gallery: list[tuple[str, str, int]] = field(default_factory=list)  # (item_id, label, row)
    queries: list[Query] = field(default_factory=list)


def plan_tenant(
    images: ImageSet,
    tenant: str,
    enrolled_classes: int,
    genuine_per_class: int,
    impostor_classes: int,
    seed: int = 0,
    gallery_per_class: int = 1,
    impostor_per_class: int = 1,
) -> TenantPlan:
    """Split one tenant's test classes into enrolled and impostor classes and pick images."""
    rng = np.random.default_rng(seed)
    rows = images.tenant_indices(tenant)
    by_class: dict[int, np.ndarray] = {}
    for label in np.unique(images.labels[rows]):
        members = rows[images.labels[rows] == label]
        if len(members) >= 2:
            by_class[int(label)] = rng.permutation(members)
    classes = rng.permutation(sorted(by_class))
    if len(classes) < 2:
        raise ValueError(f"tenant {tenant!r} has fewer than 2 classes with 2+ images")
    # leave at least 40% of the classes (and one) never enrolled, for impostor queries
    n_enrol = max(1, min(enrolled_classes, int(ENROL_SHARE * len(classes)), len(classes) - 1))
    plan = TenantPlan(tenant)
    for label in classes[:n_enrol]:
        members, name = by_class[int(label)], images.class_names[int(label)]
        enrol = max(1, min(gallery_per_class, len(members) - 1))  # keep one to query
        for row in members[:enrol]:
            plan.gallery.append((f"{tenant}-{int(row)}", name, int(row)))
        for row in members[enrol : enrol + genuine_per_class]:
            plan.queries.append(Query(int(row), name, genuine=True))
    for label in classes[n_enrol : n_enrol + impostor_classes]:
        members, name = by_class[int(label)], images.class_names[int(label)]
        for row in members[:impostor_per_class]:
            plan.queries.append(Query(int(row), name, genuine=False))
    order = rng.permutation(len(plan.queries))
    plan.queries = [plan.queries[i] for i in order]
    return plan


def png_bytes(images: ImageSet, row: int) -> bytes:
    """The image as PNG bytes, as a client would upload it."""
    buffer = io.BytesIO()
    Image.fromarray(images.image(row)).save(buffer, format="PNG")
    return buffer.getvalue()
