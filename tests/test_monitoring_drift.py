"""Score drift against the calibration reference: what PSI/KS read without and with drift.

The fast tests pin the PSI scale the alert (0.25) relies on, with scores drawn from the
shipped calibration's own reference histograms. ``python -m tests.test_monitoring_drift``
prints the table of docs/MONITORING.md: the default embedder on glyph tenants, clean and
augmented queries against small galleries, label-free FAR next to PSI/KS.
"""

from __future__ import annotations

import json

import numpy as np

from embedding.defaults import DEFAULT_CALIBRATION
from server.monitoring import ReferenceHistogram, load_references


def sample(ref: ReferenceHistogram, n: int, rng: np.random.Generator) -> np.ndarray:
    """n scores from the reference: a bin by its mass, uniform inside the bin."""
    bins = rng.choice(len(ref.fractions), size=n, p=ref.fractions)
    return rng.uniform(ref.edges[bins], ref.edges[bins + 1])


def shipped_references() -> dict[str, ReferenceHistogram]:
    assert DEFAULT_CALIBRATION.exists(), f"{DEFAULT_CALIBRATION} is shipped; it is missing"
    raw = json.loads(DEFAULT_CALIBRATION.read_text())
    return load_references(raw["reference"]["top1_similarity"])


def test_psi_of_an_unchanged_distribution_is_about_bins_over_n():
    rng = np.random.default_rng(0)
    for name, ref in shipped_references().items():
        psi = [ref.psi(sample(ref, 1000, rng)) for _ in range(20)]
        # (B - 1) / n = 0.009 for deciles and the default 1,000-decision window
        assert np.mean(psi) < 0.03, name
        assert max(psi) < 0.1, name
        assert np.mean([ref.ks(sample(ref, 1000, rng)) for _ in range(5)]) < 0.06, name


def test_a_shift_of_the_scores_crosses_the_alert_bound():
    rng = np.random.default_rng(1)
    for name, ref in shipped_references().items():
        shifted = sample(ref, 1000, rng) - 0.05
        assert ref.psi(shifted) > 0.25, name
        assert ref.ks(shifted) > 0.2, name


# ------------------------------------------------------------------------- the table

AUGMENTATIONS = ("none", "fade", "blur", "thicken", "shift", "noise")


def augment(pixels: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    x = pixels.astype(np.float32)
    if kind == "fade":  # halfway to mid-grey
        x = x * 0.5 + 127.5
    elif kind == "blur":  # two passes of a 5-point box
        for _ in range(2):
            x = (x + sum(np.roll(x, d, a) for d in (1, -1) for a in (1, 2))) / 5
    elif kind == "thicken":  # dark strokes one pixel wider
        x = np.minimum.reduce([x] + [np.roll(x, d, a) for d in (1, -1) for a in (1, 2)])
    elif kind == "shift":
        x = np.roll(x, (4, 4), (1, 2))
    elif kind == "noise":
        x = x + rng.normal(0, 60, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def main() -> None:
    from contracts import load_calibration
    from embedding import OnnxEmbedder
    from embedding.defaults import require_default_model
    from imagesets import load_images

    glyphs = load_images("glyphs", "test")
    doc = load_calibration(DEFAULT_CALIBRATION)
    doc.check_model(require_default_model())
    target = doc.target(0.001)
    raw_ref = doc.raw["reference"]["top1_similarity"]
    refs = load_references(raw_ref)
    edges = np.asarray(raw_ref["edges"])
    embedder = OnnxEmbedder(require_default_model(), device="cpu")
    labels, tenants = np.asarray(glyphs.labels), np.asarray(glyphs.tenants)
    rng = np.random.default_rng(0)
    print(f"threshold {target.threshold:.4f} for target FAR 0.001; per tenant 24 classes,")
    print("5 random images of each enrolled; baseline = 10 random clean queries per class,")
    print("live = 10 others per class\n")
    print(
        "| tenant | live queries | label-free FAR / target | PSI vs calibration "
        "| KS vs calibration | PSI vs baseline | KS vs baseline | mean top-1 | match rate |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, name in enumerate(glyphs.tenant_names):
        classes = rng.permutation(np.unique(labels[tenants == k]))[:24]
        gallery, first, second = [], [], []
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))  # renders come in order
            gallery += members[:5].tolist()
            first += members[5:15].tolist()
            second += members[15:25].tolist()
        g = embedder.embed(glyphs.pixels[gallery])
        gl = labels[gallery]
        base_top1 = (embedder.embed(glyphs.pixels[first]) @ g.T).max(1)
        idx = np.clip(np.searchsorted(edges, base_top1, "right") - 1, 0, len(edges) - 2)
        baseline = ReferenceHistogram(edges, np.bincount(idx, minlength=len(edges) - 1))
        for kind in AUGMENTATIONS:
            sims = embedder.embed(augment(glyphs.pixels[second], kind, rng)) @ g.T
            top = sims.argmax(1)
            top1 = sims.max(1)
            other = gl[None, :] != gl[top][:, None]
            lf = (sims[other] >= target.threshold).mean() / target.target_far
            ref = refs.get(name, refs[""])
            print(
                f"| {name} | {kind} | {lf:.2f} | {ref.psi(top1):.2f} | {ref.ks(top1):.2f} "
                f"| {baseline.psi(top1):.2f} | {baseline.ks(top1):.2f} "
                f"| {top1.mean():.3f} | {(top1 >= target.threshold).mean():.2f} |"
            )


if __name__ == "__main__":
    main()
