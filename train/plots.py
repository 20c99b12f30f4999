"""Figures: a run's losses, TCM margins and held-out metrics; utility curves; the sweep."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def _series(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one logged key; rows that did not log it are skipped."""
    rows = [(h.get("step", i + 1), h[key]) for i, h in enumerate(history) if key in h]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*rows, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


LOSS_KEYS = ("base", "tcm", "loss", "tcm/pos_term", "tcm/neg_term")


def plot_training(history: list[dict], epochs: list[dict], out: Path) -> None:
    """Loss terms per step; TCM margins and the measured operating range; held-out metrics.

    The middle panel is only drawn for TCM runs: the margins in force at every step
    and, for calibrated margins, the range each measurement found (FAR_hi .. FAR_lo).
    """
    has_tcm = any("tcm/margin_plus" in h for h in history)
    fig, axes = plt.subplots(1, 3 if has_tcm else 2, figsize=(15 if has_tcm else 10, 3.6))
    ax_loss, ax_eval = axes[0], axes[-1]
    window = max(1, len(history) // 50)
    for key in LOSS_KEYS:
        steps, values = _series(history, key)
        if len(values) >= window:
            ax_loss.plot(steps[window - 1 :], _smooth(values, window), label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"loss (mean of {window} steps)")
    ax_loss.legend(fontsize=8)
    if has_tcm:
        plot_margins(axes[1], history)
    if epochs:
        x = [e.get("step", e["epoch"]) for e in epochs]
        split = epochs[-1].get("split", "test")
        ax_eval.plot(x, [e["recall_at_1"] for e in epochs], "o-", label=f"Recall@1 ({split})")
        ax_eval.set_xlabel("step")
        ax_eval.set_ylabel("Recall@1")
        twin = ax_eval.twinx()
        twin.plot(x, [e["opis"] for e in epochs], "s--", color="C3", label=f"OPIS ({split})")
        twin.set_ylabel("OPIS")
        ax_eval.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_margins(ax, history: list[dict], title: str | None = None) -> None:
    """TCM's margins per step, and the operating range where it was measured."""
    for key, color, label in (
        ("tcm/margin_plus", "C2", "margin+ (genuine below: pulled up)"),
        ("tcm/margin_minus", "C3", "margin- (impostors above: pushed down)"),
    ):
        steps, values = _series(history, key)
        ax.plot(steps, values, color=color, lw=1.5, label=label)
    lo_steps, lo = _series(history, "range_lo")
    hi_steps, hi = _series(history, "range_hi")
    if len(lo):
        ax.plot(lo_steps, lo, "v", color="0.3", ms=3, label="t at FAR_hi (measured)")
        ax.plot(hi_steps, hi, "^", color="0.3", ms=3, label="t at FAR_lo (measured)")
    ax.set_xlabel("step")
    ax.set_ylabel("cosine similarity")
    ax.set_title(title or "TCM margins", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


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
    """OPIS against Recall@1 for every run: one colour per setting, one marker per base loss."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    settings = list(dict.fromkeys(r["setting"] for r in results))
    losses = list(dict.fromkeys(r["config"]["loss"] for r in results))
    markers = "oxs^vD"
    cmap = plt.get_cmap("tab20")
    for i, setting in enumerate(settings):
        runs = [r for r in results if r["setting"] == setting]
        marker = markers[losses.index(runs[0]["config"]["loss"]) % len(markers)]
        ax.scatter(
            [r["metrics"]["recall_at_1"] for r in runs],
            [r["metrics"]["opis"] for r in runs],
            marker=marker,
            color=cmap(i % 20),
            label=setting,
            s=22,
        )
    ax.set_xlabel("Recall@1 (test)")
    ax.set_ylabel("OPIS (test; lower = more threshold-consistent)")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_margin_runs(runs: dict[str, Path], out: Path) -> None:
    """The calibration-aware-margin figure: margins over training for several runs."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (title, run) in zip(axes, runs.items(), strict=True):
        history = json.loads((Path(run) / "history.json").read_text())
        plot_margins(ax, history, title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


CURVE_PANELS = (
    ("recall_at_1", "held-out Recall@1"),
    ("opis", "held-out OPIS (lower = more consistent)"),
    ("tar", "held-out TAR at FAR 1e-3"),
)


def plot_curves(results: list[dict], out: Path, title: str | None = None) -> None:
    """Every run's held-out curves against the step: one line per run, one colour per setting.

    ``results`` are run results with ``setting``, ``seed``, ``curve`` (per evaluation:
    step and metrics) and ``best_step``; the best evaluation of each run is ringed, so
    where early stopping took its checkpoint is visible. Line styles tell seeds apart.
    """
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(5.2 * len(CURVE_PANELS), 4.2))
    settings = list(dict.fromkeys(r["setting"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    styles = ("-", "--", ":", "-.")
    cmap = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes, CURVE_PANELS, strict=True):
        for r in results:
            points = [(e["step"], e[key]) for e in r["curve"] if e.get(key) is not None]
            if not points:
                continue
            x, y = zip(*points, strict=True)
            color = cmap(settings.index(r["setting"]) % 10)
            style = styles[seeds.index(r["seed"]) % len(styles)]
            ax.plot(x, y, style, color=color, lw=1.2, marker=".", ms=3)
            best = dict(points).get(r.get("best_step"))
            if best is not None:
                ax.plot(r["best_step"], best, "o", mfc="none", color=color, ms=7)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if key == "opis":
            ax.set_yscale("log")
    handles = [plt.Line2D([], [], color=cmap(i % 10), label=s) for i, s in enumerate(settings)]
    handles += [
        plt.Line2D([], [], color="0.3", ls=styles[i % len(styles)], label=f"seed {s}")
        for i, s in enumerate(seeds)
    ]
    handles.append(plt.Line2D([], [], color="0.3", ls="", marker="o", mfc="none", label="best"))
    axes[0].legend(handles=handles, fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
