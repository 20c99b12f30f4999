"""PNG plots: FAR vs threshold per dataset, and utility curves per dataset and per class.

Rendered into memory first (bytes), so the CLI writes them only after everything
else has succeeded.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from calibrate.engine.results import Evaluation

if TYPE_CHECKING:
    from calibrate.heldout.serving import ServingReport


def render(ev: Evaluation, serving: ServingReport | None = None) -> dict[str, bytes]:
    """{file name: PNG bytes}; empty when the calibration range was not measurable."""
    import matplotlib

    matplotlib.use("Agg")
    out = {}
    if serving is not None and serving.held_out:
        out["far_raw_vs_normalized.png"] = far_raw_vs_normalized(serving)
    if ev.far_curves:
        out["far_vs_threshold.png"] = _far(ev)
    if ev.grid is not None:
        out["utility_datasets.png"] = _utility_datasets(ev)
    if ev.class_utility is not None and len(ev.class_utility):
        out["utility_classes.png"] = _utility_classes(ev)
    return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _far(ev: Evaluation) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, (grid, far)) in enumerate(ev.far_curves.items()):
        c = colors[i % len(colors)]
        ax.plot(grid, np.where(far > 0, far, np.nan), color=c, label=name)
        for t in ev.targets:
            own = next(d.threshold for d in t.datasets if d.name == name)
            if own is not None and grid[0] <= own <= grid[-1]:
                ax.axvline(own, color=c, linestyle=":", linewidth=1)
    for t in ev.targets:
        if t.threshold is not None:
            ax.axvline(t.threshold, color="black", linewidth=1.5)
            ax.axhline(t.target_far, color="gray", linestyle="--", linewidth=1)
    if ev.similarity_range is not None:
        ax.axvspan(*ev.similarity_range, color="gray", alpha=0.1, label="OPIS range")
    ax.set_yscale("log")
    ax.set_xlabel("similarity threshold t (match when s >= t)")
    ax.set_ylabel("FAR(t) inside the dataset")
    ax.set_title("FAR vs threshold: global threshold (solid), each dataset's own (dotted)")
    ax.legend(fontsize=8)
    return _png(fig)


def _utility_datasets(ev: Evaluation) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in ev.datasets:
        if d.utility is not None:
            ax.plot(ev.grid, d.utility, label=d.name)
    ax.set_xlabel("similarity threshold t")
    ax.set_ylabel("utility (F-beta of TAR and TRR)")
    cross = ev.cross_dataset.opis
    ax.set_title(f"Utility per dataset in the calibration range (OPIS {cross:.2e})")
    ax.legend(fontsize=8)
    return _png(fig)


def _utility_classes(ev: Evaluation) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    u = ev.class_utility
    for row in u:
        ax.plot(ev.grid, row, color="tab:blue", alpha=0.08, linewidth=0.8)
    ax.plot(ev.grid, u.mean(axis=0), color="black", linewidth=2, label="mean over classes")
    ax.set_xlabel("similarity threshold t")
    ax.set_ylabel("per-class utility")
    ax.set_title(f"Utility per class ({len(u)} classes), OPIS {ev.overall.opis:.2e}")
    ax.legend(fontsize=8)
    return _png(fig)


def far_raw_vs_normalized(serving: ServingReport) -> bytes:
    """Per dataset FAR / target at the global threshold, raw vs normalised, with intervals."""
    import matplotlib.pyplot as plt

    results = sorted(serving.held_out or [], key=lambda r: -r.target_far)
    fig, axes = plt.subplots(1, len(results), figsize=(4.4 * len(results), 4.4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        names = [d.name for d in r.datasets]
        x = np.arange(len(names))
        for dx, key, color in ((-0.18, "raw", "tab:gray"), (0.18, "normalized", "tab:blue")):
            far = [getattr(d, key) for d in r.datasets]
            y = np.array([np.nan if f.far is None else f.far / r.target_far for f in far])
            lo = np.array([np.nan if f.ci is None else f.ci[0] / r.target_far for f in far])
            hi = np.array([np.nan if f.ci is None else f.ci[1] / r.target_far for f in far])
            err = np.vstack([np.maximum(y - lo, 0), np.maximum(hi - y, 0)])
            label = "raw" if key == "raw" else serving.served.method
            ax.errorbar(x + dx, y, yerr=err, fmt="o", color=color, capsize=3, label=label)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.axhspan(0.5, 2.0, color="tab:green", alpha=0.08, label="[a/2, 2a]")
        ax.set_yscale("log")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"target FAR {r.target_far:g}")
    axes[0][0].set_ylabel("FAR / target on held-out classes")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("One global threshold: each dataset's FAR, raw and normalised (95% CI)")
    fig.tight_layout()
    return _png(fig)
