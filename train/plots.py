"""Figures of a run: training losses per step and held-out metrics per epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def plot_training(history: list[dict], epochs: list[dict], out: Path) -> None:
    """Left: each loss term per step (smoothed). Right: Recall@1 and OPIS per epoch."""
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.6))
    keys = [k for k in (history[0] if history else {}) if k != "epoch"]
    window = max(1, len(history) // 50)
    for key in keys:
        values = np.array([h[key] for h in history], dtype=float)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax_loss.plot(np.arange(len(smooth)) + window - 1, smooth, label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"loss (mean of {window} steps)")
    ax_loss.legend(fontsize=8)
    if epochs:
        x = [e["epoch"] for e in epochs]
        ax_eval.plot(x, [e["recall_at_1"] for e in epochs], "o-", label="Recall@1")
        ax_eval.set_xlabel("epoch")
        ax_eval.set_ylabel("Recall@1")
        twin = ax_eval.twinx()
        twin.plot(x, [e["opis"] for e in epochs], "s--", color="C3", label="OPIS")
        twin.set_ylabel("OPIS")
        ax_eval.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_utility_pair(without: Path, with_tcm: Path, out: Path) -> None:
    """Per-class utility vs threshold without and with TCM (the paper's Figure 2 view).

    Thin lines are classes, the thick line their mean; the shaded band is the 5-95%
    spread across classes. OPIS measures exactly this spread around the mean.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, run, title in ((axes[0], without, "without TCM"), (axes[1], with_tcm, "with TCM")):
        data = np.load(Path(run) / "utility_curves.npz")
        grid, u = data["grid"], data["class_utility"]
        for row in u[:: max(1, len(u) // 150)]:
            ax.plot(grid, row, color="0.6", lw=0.4, alpha=0.5)
        lo, hi = np.percentile(u, [5, 95], axis=0)
        ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, label="5-95% of classes")
        ax.plot(grid, u.mean(axis=0), color="C0", lw=2, label="mean")
        opis = float(((u - u.mean(axis=0)) ** 2).mean())
        ax.set_title(f"{Path(run).name}: {title} (OPIS {opis:.2e})", fontsize=9)
        ax.set_xlabel("similarity threshold (global FAR 1e-2 .. 1e-4)")
    axes[0].set_ylabel("per-class utility")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_sweep(results: list[dict], out: Path) -> None:
    """OPIS against Recall@1 for every run; arrows join each baseline to its +TCM twin."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_name = {r["name"]: r["metrics"] for r in results}
    for r in results:
        m = r["metrics"]
        tcm = r["config"].get("tcm")
        ax.scatter(
            m["recall_at_1"], m["opis"], marker="o" if tcm else "x", color="C3" if tcm else "C0"
        )
        ax.annotate(r["name"], (m["recall_at_1"], m["opis"]), fontsize=6)
        twin = r["name"].replace("-s", "-tcm-s", 1)
        if not tcm and twin in by_name:
            t = by_name[twin]
            ax.annotate(
                "",
                (t["recall_at_1"], t["opis"]),
                (m["recall_at_1"], m["opis"]),
                arrowprops={"arrowstyle": "->", "color": "0.5"},
            )
    ax.set_xlabel("Recall@1")
    ax.set_ylabel("OPIS (lower = more threshold-consistent)")
    ax.set_title("x: base loss, o: + TCM", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
