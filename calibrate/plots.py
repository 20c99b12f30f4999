"""PNG plots: FAR vs threshold per dataset, and utility curves per dataset and per class.

Rendered into memory first (bytes), so the CLI writes them only after everything
else has succeeded.
"""

from __future__ import annotations

import io

import numpy as np

from calibrate.results import Evaluation


def render(ev: Evaluation) -> dict[str, bytes]:
    """{file name: PNG bytes}; empty when the calibration range was not measurable."""
    import matplotlib

    matplotlib.use("Agg")
    out = {}
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
