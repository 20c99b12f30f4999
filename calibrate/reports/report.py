"""The terminal table and the Markdown report of an evaluation."""

from __future__ import annotations

from calibrate.engine.results import Evaluation, TargetResult


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "n/a" if v is None else format(v, fmt)


def name_width(names) -> int:
    """The dataset column: 14 characters, wider when a name needs it."""
    return max([14] + [len(n) + 2 for n in names])


def table(ev: Evaluation) -> str:
    """Per target: the global threshold, then one row per dataset; then consistency."""
    lines = []
    width = name_width(d.name for d in ev.datasets)
    for t in ev.targets:
        lines.append(_target_header(t))
        lines.append(
            f"  {'dataset':<{width}}{'FAR@global':>12}{'FAR ratio':>11}{'FRR@global':>12}"
            f"{'own thr':>10}{'drift':>10}"
        )
        for d in t.datasets:
            own = "n/a" if d.threshold is None else f"{d.threshold:.4f}"
            lines.append(
                f"  {d.name:<{width}}{_num(d.far, '.2e'):>12}{_num(d.far_ratio, '.2f'):>11}"
                f"{_num(d.frr):>12}{own:>10}{_num(d.threshold_drift, '+.4f'):>10}"
            )
        for w in t.warnings:
            lines.append(f"  warning: {w}")
        lines.append("")
    lines.append(_consistency(ev))
    return "\n".join(lines)


def _target_header(t: TargetResult) -> str:
    if t.threshold is None:
        return f"target FAR {t.target_far:g}: NOT MEASURABLE on {t.impostor_pairs} impostor pairs"
    ci = ""
    if t.ci is not None and t.ci.far is not None:
        ci = f", {t.ci.level:.0%} CI FAR [{t.ci.far[0]:.2e}, {t.ci.far[1]:.2e}]"
        if t.ci.threshold is not None:
            ci += f" threshold [{t.ci.threshold[0]:.4f}, {t.ci.threshold[1]:.4f}]"
    return (
        f"target FAR {t.target_far:g}: threshold similarity {t.threshold:.6f} "
        f"(distance {t.distance:.6f}), k={t.k} of {t.impostor_pairs} impostor pairs, "
        f"achieved FAR {t.achieved_far:.3e} ({t.accepted_impostors} accepted), "
        f"TAR {t.tar:.4f}, FRR {t.frr:.4f}{ci}"
    )


def _consistency(ev: Evaluation) -> str:
    rng = ev.similarity_range
    span = "n/a" if rng is None else f"[{rng[0]:.4f}, {rng[1]:.4f}]"
    lo, hi = ev.settings["far_range"]
    width = name_width(d.name for d in ev.datasets)
    lines = [
        f"consistency over FAR {lo:g}..{hi:g} (similarity {span}, "
        f"{ev.settings['grid_size']} thresholds):",
        f"  {'dataset':<{width}}{'images':>8}{'classes':>9}{'OPIS':>11}{'eps-OPIS':>11}"
        f"{'OPIS drift':>12}{'Recall@1':>10}",
    ]
    for d in ev.datasets:
        lines.append(
            f"  {d.name:<{width}}{d.images:>8}{d.classes:>9}{_num(d.opis.opis, '.2e'):>11}"
            f"{_num(d.opis.eps_opis, '.2e'):>11}{_num(d.opis_drift, '.2e'):>12}"
            f"{_num(d.recall_at_1):>10}"
        )
    lines.append(
        f"  overall: OPIS {_num(ev.overall.opis, '.3e')}, eps-OPIS "
        f"{_num(ev.overall.eps_opis, '.3e')}, Recall@1 {ev.recall_at_1:.4f}"
    )
    lines.append(
        f"  across datasets: OPIS {_num(ev.cross_dataset.opis, '.3e')}, eps-OPIS "
        f"{_num(ev.cross_dataset.eps_opis, '.3e')}"
    )
    return "\n".join(lines)


def markdown(
    ev: Evaluation, model: str, sources: list[str], plots: list[str], serving: str = ""
) -> str:
    """A short report that embeds the plots (paths relative to the report)."""
    parts = [
        "# Calibration report",
        "",
        f"Model: `{model}`  ",
        f"Data: {', '.join(f'`{s}`' for s in sources)}  ",
        f"Settings: {ev.settings}",
        "",
        "```",
        table(ev) + serving,
        "```",
        "",
    ]
    parts += [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"
