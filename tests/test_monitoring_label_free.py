"""The label-free FAR estimator of the live server against the true FAR, on glyph tenants.

The estimator (server/storage/faiss/gallery.py, fed to LiveMonitor): for each query,
among the tenant's gallery items whose label differs from the top-1's, the fraction at
or above the threshold. The truth needs the query's label, which a live server does not have.

Tests check what holds by construction: when the top-1 is right the estimate's counts are
exactly the query's impostor pairs; for a query of an unenrolled class it never counts
more accepted pairs than there are. ``python -m tests.test_monitoring_label_free`` prints
the comparison table of docs/MONITORING.md (default embedder, full glyph test split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.monitoring import wilson_interval
from server.storage.faiss.gallery import Gallery, Item


@dataclass(frozen=True)
class Counts:
    """Per-query label-free and true counts at one threshold."""

    lf_accepted: np.ndarray
    lf_total: np.ndarray
    true_accepted: np.ndarray
    true_total: np.ndarray
    top1_correct: np.ndarray  # the top-1's label is the query's
    enrolled: np.ndarray  # the query's class is in the gallery
    accepted: np.ndarray  # top-1 similarity >= threshold (the decision)


def measure(
    directory: Path,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    threshold: float,
) -> Counts:
    """Runs the server's Gallery search and counts the truth next to it."""
    store = Gallery.open(directory, gallery.shape[1], "m" * 64)
    try:
        items = [Item(f"g{i}", str(lab), b"") for i, lab in enumerate(gallery_labels)]
        assert store.add(items, gallery, "m" * 64) == [None] * len(items)
        results = store.search(queries, 1, "m" * 64)
    finally:
        store.close()
    sims = queries @ gallery.T
    impostor = gallery_labels[None, :] != query_labels[:, None]
    return Counts(
        lf_accepted=np.array([r.impostor_accepted for r in results]),
        lf_total=np.array([r.impostor_total for r in results]),
        true_accepted=((sims >= threshold) & impostor).sum(axis=1),
        true_total=impostor.sum(axis=1),
        top1_correct=np.array(
            [r.top1.label == str(q) for r, q in zip(results, query_labels, strict=True)]
        ),
        enrolled=np.isin(query_labels, gallery_labels),
        accepted=np.array([r.top1.similarity >= threshold for r in results]),
    )


def exact_threshold(embeddings: np.ndarray, labels: np.ndarray, far: float) -> float:
    """t*(a) of DESIGN.md: the smallest similarity accepting at most floor(a M) impostor pairs."""
    sims = embeddings @ embeddings.T
    upper = np.triu_indices(len(labels), 1)
    impostor = np.sort(sims[upper][labels[upper[0]] != labels[upper[1]]])[::-1]
    k = math.floor(far * len(impostor))
    return float(np.nextafter(impostor[k], np.float32(np.inf)))


def split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gallery, query) indices: ``per_class`` seeded images of each class enrolled."""
    rng = np.random.default_rng(seed)
    gallery = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        gallery += rng.choice(members, min(per_class, len(members) - 1), replace=False).tolist()
    gallery_set = set(gallery)
    return np.array(sorted(gallery)), np.array(
        [i for i in range(len(labels)) if i not in gallery_set]
    )


# ------------------------------------------------------------------------------- tests


def test_label_free_counts_are_exact_when_the_top1_is_right(tiny_glyphs, linear_model, tmp_path):
    from embedding import OnnxEmbedder

    labels = np.asarray(tiny_glyphs.labels)
    keep = np.flatnonzero(np.asarray(tiny_glyphs.tenants) == 0)  # one tenant: 6 classes
    emb = OnnxEmbedder(linear_model, device="cpu").embed(tiny_glyphs.pixels[keep])
    labels = labels[keep]
    unseen = np.unique(labels)[-2:]
    enrolled_rows = np.flatnonzero(~np.isin(labels, unseen))
    g, q = split(labels[enrolled_rows], per_class=8, seed=0)
    gallery, queries = (
        enrolled_rows[g],
        np.r_[enrolled_rows[q], np.flatnonzero(np.isin(labels, unseen))],
    )
    threshold = exact_threshold(emb, labels, 0.05)
    c = measure(
        tmp_path / "g", emb[gallery], labels[gallery], emb[queries], labels[queries], threshold
    )

    right = c.top1_correct
    assert right.sum() > 20 and (~c.enrolled).sum() > 20
    np.testing.assert_array_equal(c.lf_accepted[right], c.true_accepted[right])
    np.testing.assert_array_equal(c.lf_total[right], c.true_total[right])
    # An unenrolled query: every item is an impostor; the estimate drops the top-1's class.
    out = ~c.enrolled
    assert np.all(c.lf_accepted[out] <= c.true_accepted[out])
    np.testing.assert_array_equal(c.true_total[out], len(gallery))
    assert np.all(c.lf_total[out] < c.true_total[out])
    # Any query: the estimate's pairs are the gallery minus the top-1's class (8 items each).
    np.testing.assert_array_equal(c.lf_total, len(gallery) - 8)


# ------------------------------------------------------------------------- the table


def _row(name: str, c: Counts, rows: np.ndarray, gallery_size: int) -> str:
    lf_a, lf_n = int(c.lf_accepted[rows].sum()), int(c.lf_total[rows].sum())
    t_a, t_n = int(c.true_accepted[rows].sum()), int(c.true_total[rows].sum())
    lo, hi = wilson_interval(t_a, t_n)
    lf = lf_a / lf_n if lf_n else float("nan")
    true = t_a / t_n if t_n else float("nan")
    inside = "yes" if lo <= lf <= hi else "no"
    imp = rows & ~c.top1_correct
    decision = c.accepted[imp].mean() if imp.any() else float("nan")
    expected = 1 - (1 - true) ** gallery_size
    return (
        f"| {name} | {rows.sum()} | {lf:.4f} ({lf_a}/{lf_n}) | {true:.4f} ({t_a}/{t_n}) "
        f"| {lo:.4f}-{hi:.4f} | {inside} | {decision:.3f} | {expected:.3f} |"
    )


HEADER = (
    "| tenant / queries | queries | label-free FAR | true pair FAR | 95% CI of true | inside "
    "| impostor-decision FAR | 1-(1-true)^G |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    """Label-free vs true FAR per glyph tenant with the default embedder."""
    import tempfile

    from embedding import OnnxEmbedder
    from embedding.defaults import require_default_model
    from imagesets import load_images

    rng = np.random.default_rng(0)
    glyphs = load_images("glyphs", "test")
    labels, tenants = np.asarray(glyphs.labels), np.asarray(glyphs.tenants)
    plan = {}
    for k, name in enumerate(glyphs.tenant_names):
        classes = rng.permutation(np.unique(labels[tenants == k]))[:30]
        plan[name] = (classes[:10], classes[10:24], classes[24:30])  # calib, enrolled, unseen
    rows = np.flatnonzero(
        np.isin(labels, np.concatenate([np.concatenate(p) for p in plan.values()]))
    )
    embedder = OnnxEmbedder(require_default_model(), device="cpu")
    emb = dict(zip(rows.tolist(), embedder.embed(glyphs.pixels[rows]), strict=True))
    calib = np.flatnonzero(np.isin(labels, np.concatenate([p[0] for p in plan.values()])))
    calib_emb = np.stack([emb[i] for i in calib])
    for far in (1e-3, 1e-2):
        t = exact_threshold(calib_emb, labels[calib], far)
        print(f"\ntarget FAR {far:g}: threshold {t:.4f}", end=" ")
        print(f"(exact order statistic over {len(calib)} calibration images)\n")
        print(HEADER)
        for name, (_, enrolled, unseen) in plan.items():
            ids = np.flatnonzero(np.isin(labels, np.concatenate([enrolled, unseen])))
            in_gallery = np.isin(labels[ids], enrolled)
            g, q = split(labels[ids][in_gallery], per_class=5, seed=1)
            gallery = ids[in_gallery][g]
            queries = np.r_[ids[in_gallery][q], ids[~in_gallery]]
            with tempfile.TemporaryDirectory() as tmp:
                c = measure(
                    Path(tmp),
                    np.stack([emb[i] for i in gallery]),
                    labels[gallery],
                    np.stack([emb[i] for i in queries]),
                    labels[queries],
                    t,
                )
            print(_row(f"{name} / enrolled classes", c, c.enrolled, len(gallery)))
            print(_row(f"{name} / unseen classes", c, ~c.enrolled, len(gallery)))


if __name__ == "__main__":
    main()
