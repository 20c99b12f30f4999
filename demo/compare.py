"""``--compare``: a baseline and a TCM model trained on the same budget, side by side.

Both runs go through ``python -m train`` with the same config and seed, differing only
in ``--no-tcm``/``--tcm``, and the table reads the metrics each run wrote, so the
comparison is exactly the one a user would make by hand.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from demo.config import DemoConfig

COLUMNS = (
    ("Recall@1", "recall_at_1", "{:.3f}"),
    ("MAP@R", "map_at_r", "{:.3f}"),
    ("OPIS", "opis", "{:.2e}"),
    ("eps-OPIS", "eps_opis", "{:.2e}"),
    ("FAR min", "far_min", "{:.2e}"),
    ("FAR max", "far_max", "{:.2e}"),
    ("FAR max/min", "far_spread", "{:.1f}"),
)


def _cell(value: float | None, fmt: str) -> str:
    """A metric the run did not write shows as '-'; None is JSON's stand-in for infinity."""
    return "-" if value is None else fmt.format(value)


def train_argv(out: Path, tcm: bool, config: DemoConfig) -> list[str]:
    argv = [sys.executable, "-m", "train", "--out", str(out), "--seed", str(config.seed)]
    argv += ["--device", config.device, "--tcm" if tcm else "--no-tcm"]
    if config.compare_steps and not config.tiny:  # the same budget for both runs
        argv += ["--epochs", "1", "--steps-per-epoch", str(config.compare_steps)]
    return [*argv, "--tiny"] if config.tiny else argv


def compare_models(config: DemoConfig, run_step: Callable[[str, list[str]], None]) -> str:
    root = config.out / "compare"
    runs = {"baseline": False, "baseline + TCM": True}
    metrics = {}
    for name, tcm in runs.items():
        out = root / ("tcm" if tcm else "baseline")
        run_step(f"train {name}", train_argv(out, tcm, config))
        metrics[name] = json.loads((out / "metrics.json").read_text())
    text = comparison_table(metrics)
    (root / "comparison.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    return text


def comparison_table(metrics: dict[str, dict[str, float]]) -> str:
    widths = [max(len(title), 9) + 2 for title, _, _ in COLUMNS]
    head = f"{'model':<16}" + "".join(
        f"{title:>{w}}" for (title, _, _), w in zip(COLUMNS, widths, strict=True)
    )
    rows = [head, "-" * len(head)]
    for name, values in metrics.items():
        cells = "".join(
            f"{_cell(values.get(key), fmt):>{w}}"
            for (_, key, fmt), w in zip(COLUMNS, widths, strict=True)
        )
        rows.append(f"{name:<16}{cells}")
    rows.append(
        "FAR min/max: per-tenant FAR at the one global threshold for the target FAR; lower\n"
        "OPIS, eps-OPIS and max/min mean that threshold gives the same FAR everywhere "
        "('-': a tenant had FAR 0)"
    )
    return "\n".join(rows)
