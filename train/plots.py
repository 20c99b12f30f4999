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
