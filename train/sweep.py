"""``python -m train.sweep``: base loss with and without TCM, fixed vs calibrated margins, seeds.

Every combination of base loss x TCM setting x seed trains with the same data, steps and
held-out classes; a TCM setting is ``base`` (no TCM), or a margin mode (``fixed``: the
paper's 0.9 / 0.5, ``calibrated``: the model's operating range, train/margins.py) with a
weight lambda (both TCM terms). Runs already in ``OUT/results.json`` are skipped, so a
sweep can be stopped, resumed and extended (more seeds, more lambdas) in place.

The report (``OUT/results.md`` and stdout) has every run, the mean +- std over seeds of
each setting, and each TCM setting against its own base loss, paired by seed, with a
plain statement of which changes lie inside the seed-to-seed noise.

  python -m train.sweep --out out/sweep --seeds 0 --lambdas 1 3 10 30          # screening
  python -m train.sweep --out out/sweep --seeds 0 1 2 --only proxy_anchor:calibrated:10
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts import atomic_write_text
from train.config import load_config
from train.jobs import claim

MODES = ("base", "fixed", "calibrated")
COLUMNS = {
    "recall_at_1": ("R@1", "{:.4f}"),
    "map_at_r": ("MAP@R", "{:.4f}"),
    "opis": ("OPIS", "{:.2e}"),
    "eps_opis": ("eps-OPIS", "{:.3f}"),
    "tenant_opis": ("tenant OPIS", "{:.2e}"),
    "tar": ("TAR@1e-3", "{:.4f}"),
    "far_spread": ("FAR max/min", "{:.0f}"),
}


@dataclass(frozen=True)
class Setting:
    """One point of the sweep without its seed: base loss, TCM mode, lambda (and offset)."""

    loss: str
    mode: str
    lam: float = 0.0
    offset: float = 0.0  # calibrated margins only (train/margins.py)

    @property
    def name(self) -> str:
        if self.mode == "base":
            return self.loss
        return f"{self.loss}-{self.mode}-l{self.lam:g}" + (
            f"-o{self.offset:g}" if self.offset else ""
        )

    def changes(self, seed: int) -> dict[str, Any]:
        out: dict[str, Any] = {"loss": self.loss, "seed": seed, "tcm": self.mode != "base"}
        if self.mode != "base":
            out.update(margins=self.mode, lambda_plus=self.lam, lambda_minus=self.lam)
        if self.offset:
            out["margin_offset"] = self.offset
        return out

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``loss``, ``loss:base``, ``loss:MODE:LAMBDA`` or ``loss:calibrated:LAMBDA:OFFSET``."""
        parts = text.split(":")
        if len(parts) == 1 or parts[1:] == ["base"]:
            return cls(parts[0], "base")
        if len(parts) == 3 and parts[1] in MODES[1:]:
            return cls(parts[0], parts[1], float(parts[2]))
        if len(parts) == 4 and parts[1] == "calibrated":
            return cls(parts[0], parts[1], float(parts[2]), float(parts[3]))
        raise ValueError(
            f"setting {text!r}: expected LOSS, LOSS:base, LOSS:fixed|calibrated:LAMBDA "
            "or LOSS:calibrated:LAMBDA:OFFSET"
        )


def plan(
    losses: Sequence[str],
    modes: Sequence[str],
    lambdas: Sequence[float],
    seeds: Sequence[int],
    only: Sequence[str] = (),
) -> list[tuple[str, Setting, int]]:
    """(run name, setting, seed) in run order: seed-major, each loss's base run first."""
    if only:
        settings = [Setting.parse(s) for s in only]
    else:
        settings = []
        for loss in losses:
            settings.append(Setting(loss, "base"))
            settings += [Setting(loss, m, lam) for m in modes if m != "base" for lam in lambdas]
    return [(f"{s.name}-s{seed}", s, seed) for seed in seeds for s in settings]


# ---- the report --------------------------------------------------------------------
def _value(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _cell(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else fmt.format(v)


def table(results: list[dict]) -> str:
    """Every run, one row each (test split metrics)."""
    head = "| run | steps | " + " | ".join(t for t, _ in COLUMNS.values()) + " | val R@1 |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in results:
        m = r["metrics"]
        cells = [_cell(_value(m, k), fmt) for k, (_, fmt) in COLUMNS.items()]
        val = _cell(_value(m.get("val") or {}, "recall_at_1"), "{:.4f}")
        rows.append(
            f"| {r['name']} | {m.get('steps', 'n/a')} | " + " | ".join(cells) + f" | {val} |"
        )
    return "\n".join(rows)


def _by_setting(results: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in results:
        out.setdefault(r["setting"], {})[r["seed"]] = r["metrics"]
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    m, s = mean_std(values)
    return f"{fmt.format(m)} ± {fmt.format(s)}"


def seed_summary(results: list[dict]) -> str:
    """Mean ± std over seeds of every setting; FAR max/min as its geometric mean."""
    head = "| setting | seeds | " + " | ".join(t for t, _ in COLUMNS.values()) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for setting, runs in _by_setting(results).items():
        cells = []
        for key, (_, fmt) in COLUMNS.items():
            vals = [v for m in runs.values() if (v := _value(m, key)) is not None]
            if key == "far_spread":
                missing = len(runs) - len(vals)
                text = _pm([math.log10(v) for v in vals], "{:.2f}") if vals else "n/a"
                cells.append(f"log10 {text}" + (f" ({missing} n/a)" if missing else ""))
            else:
                cells.append(_pm(vals, fmt))
        rows.append(f"| {setting} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


RELATIVE_KEYS = ("opis", "eps_opis", "tenant_opis")  # paired change as a fraction of the base
POINT_KEYS = ("recall_at_1", "tar")  # paired change as a difference (x100 = points)


def _base_of(setting: str, bases: Mapping[str, str] | None) -> str | None:
    """The setting ``setting`` is compared with: ``bases`` if given, else its loss prefix."""
    if bases is not None:
        return bases.get(setting)
    loss = setting.split("-", 1)[0]
    return None if loss == setting else loss


def paired_changes(
    results: list[dict], bases: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Each TCM setting against its base on the same seeds: per-seed changes.

    The base is the setting named by the loss prefix (``ms-calibrated-l10`` -> ``ms``),
    or ``bases[setting]`` when a mapping is given (the convergence matrix names its
    pairs explicitly). Relative changes for the OPIS family, differences for the rest.
    """
    by = _by_setting(results)
    out = []
    for setting, runs in by.items():
        loss = _base_of(setting, bases)
        if loss is None or loss not in by:
            continue
        seeds = sorted(set(runs) & set(by[loss]))
        if not seeds:
            continue
        base, tcm = [by[loss][s] for s in seeds], [runs[s] for s in seeds]
        row: dict[str, Any] = {"setting": setting, "base": loss, "seeds": seeds}
        for key in RELATIVE_KEYS:
            row[key] = [(t[key] - b[key]) / b[key] for b, t in zip(base, tcm, strict=True)]
            row[f"{key}_base_cv"] = _cv([b[key] for b in base])
        for key in POINT_KEYS:
            row[key] = [
                t[key] - b[key]
                for b, t in zip(base, tcm, strict=True)
                if t.get(key) is not None and b.get(key) is not None
            ]
        out.append(row)
    return out


def _cv(values: list[float]) -> float | None:
    """Coefficient of variation over seeds: the relative noise of one metric."""
    if len(values) < 2:
        return None
    m, s = mean_std(values)
    return s / m if m else None


def noise(values: Sequence[float]) -> dict[str, Any]:
    """Mean, std and standard error of paired changes, and whether the mean is outside
    the seed noise (|mean| > 2 standard errors; unknowable from one seed: ``None``)."""
    n = len(values)
    m, s = mean_std(values) if n else (math.nan, math.nan)
    se = s / math.sqrt(n) if n > 1 else None
    outside = None if se is None else abs(m) > 2 * se
    return {"per_seed": list(values), "n": n, "mean": m, "std": s, "se": se, "outside": outside}


def summary(results: list[dict], bases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The report as data: mean ± std per setting and paired changes with their noise."""
    settings: dict[str, Any] = {}
    for setting, runs in _by_setting(results).items():
        entry: dict[str, Any] = {"seeds": sorted(runs)}
        for key in COLUMNS:
            vals = [v for m in runs.values() if (v := _value(m, key)) is not None]
            name = key
            if key == "far_spread":  # a ratio: averaged on a log scale, as in the table
                name, vals = "log10_far_spread", [math.log10(v) for v in vals]
            entry[name] = dict(zip(("mean", "std"), mean_std(vals), strict=True)) if vals else None
        settings[setting] = entry
    paired = []
    for row in paired_changes(results, bases):
        item: dict[str, Any] = {"setting": row["setting"], "base": row["base"]}
        item["seeds"] = row["seeds"]
        item |= {key: noise(row[key]) for key in (*RELATIVE_KEYS, *POINT_KEYS)}
        paired.append(item)
    return {"settings": settings, "paired": paired}


def comparison(
    results: list[dict],
    opis_goal: float = -0.30,
    recall_window: float = 0.01,
    bases: Mapping[str, str] | None = None,
) -> str:
    """The paper-style table: change vs base per TCM setting (mean ± std over paired seeds)."""
    rows = [
        "| TCM setting | vs | seeds | OPIS change | eps-OPIS change | tenant OPIS change "
        "| R@1 change (pt) | TAR@1e-3 change (pt) | goal met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for row in paired_changes(results, bases):
        o, e, t = row["opis"], row["eps_opis"], row["tenant_opis"]
        r1 = [100 * v for v in row["recall_at_1"]]
        tar = [100 * v for v in row["tar"]]
        met = (
            len(row["seeds"]) >= 3
            and max(o) <= opis_goal
            and max(e) <= opis_goal
            and min(row["recall_at_1"]) >= -recall_window
        )
        rows.append(
            f"| {row['setting']} | {row['base']} | {len(row['seeds'])} | {_pm(o, '{:+.0%}')} | "
            f"{_pm(e, '{:+.0%}')} | {_pm(t, '{:+.0%}')} | {_pm(r1, '{:+.1f}')} | "
            f"{_pm(tar, '{:+.1f}')} | {'yes' if met else 'no'} |"
        )
        notes.append(_noise_note(row))
    goal = (
        f"Goal: OPIS and eps-OPIS change <= {opis_goal:.0%} on every seed (>= 3 seeds) with "
        f"Recall@1 no more than {100 * recall_window:.0f} point below the base loss."
    )
    return "\n".join([*rows, "", goal, "", *[n for n in notes if n]])


def _noise_note(row: dict[str, Any]) -> str:
    """Which mean changes are larger than two standard errors of the paired difference."""
    n = len(row["seeds"])
    if n < 2:
        return f"- {row['setting']}: one seed, noise not measurable."
    parts = []
    for key, label in (("opis", "OPIS"), ("eps_opis", "eps-OPIS"), ("tenant_opis", "tenant OPIS")):
        change = noise(row[key])
        where = "outside" if change["outside"] else "inside"
        parts.append(f"{label} {change['mean']:+.0%} {where} the noise")
    change = noise(row["recall_at_1"])
    where = "outside" if change["outside"] else "inside"
    parts.append(f"R@1 {100 * change['mean']:+.1f} pt {where} the noise")
    return f"- {row['setting']} ({n} seeds; noise = 2 standard errors of the paired change): " + (
        ", ".join(parts)
    )


def report(results: list[dict], bases: Mapping[str, str] | None = None) -> str:
    return "\n\n".join(
        [
            "### Every run (test split)",
            table(results),
            "### Mean ± std over seeds",
            seed_summary(results),
            "### TCM against the same base loss (paired by seed)",
            comparison(results, bases=bases),
        ]
    )


# ---- running -----------------------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as config changes (values as Python literals, else text)."""
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.replace("-", "_")] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=Path("train/configs/sweep.toml"))
    parser.add_argument("--out", type=Path, default=Path("out/sweep"))
    parser.add_argument("--losses", nargs="+", default=["multi_similarity", "proxy_anchor"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--only", nargs="+", default=[], help="run just these settings (LOSS[:MODE:LAMBDA])"
    )
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run"
    )
    parser.add_argument("--report", action="store_true", help="only print the report")
    parser.add_argument("--figures", type=Path, help="also write the figures to this folder")
    args = parser.parse_args(argv)
    results_path = args.out / "results.json"
    if not args.report:
        base = load_config(args.config).replace(**parse_overrides(args.set))
        for name, setting, seed in plan(
            args.losses, args.modes, args.lambdas, args.seeds, args.only
        ):
            if name in {r["name"] for r in _read(results_path)} or not claim(args.out / name):
                continue
            _append(results_path, train_one(base, setting, seed, args.out / name, name))
    results = _read(results_path)
    if args.figures:
        write_figures(results, args.out, args.figures)
    md = report(results)
    atomic_write_text(args.out / "results.md", md + "\n")
    print(md)
    return 0


def write_figures(results: list[dict], out: Path, figures: Path) -> None:
    """The sweep scatter, and per base loss the margins and utility curves of seed 0.

    For each base loss, the calibrated setting run on the most seeds (ties: larger
    lambda) is drawn against its fixed-margin twin (margins over training) and
    against the base loss (per-class utility, the paper's Figure 2 view).
    """
    from train.plots import plot_margin_runs, plot_sweep, plot_utility_pair

    figures.mkdir(parents=True, exist_ok=True)
    plot_sweep(results, figures / "train_sweep.png")
    by = _by_setting(results)
    for loss in dict.fromkeys(r["config"]["loss"] for r in results):
        calibrated = {
            s: lam for s in by if (lam := _calibrated_lambda(s, loss)) is not None and 0 in by[s]
        }
        if not calibrated:
            continue
        best = max(calibrated, key=lambda s: (len(by[s]), calibrated[s]))
        fixed = best.replace("-calibrated-", "-fixed-")
        runs = {f"{fixed} (paper's margins)": out / f"{fixed}-s0"} if 0 in by.get(fixed, {}) else {}
        runs[f"{best} (calibrated)"] = out / f"{best}-s0"
        plot_margin_runs(runs, figures / f"train_margins_{loss}.png")
        if 0 in by.get(loss, {}):
            plot_utility_pair(
                out / f"{loss}-s0", out / f"{best}-s0", figures / f"train_utility_{loss}.png"
            )


def _calibrated_lambda(setting: str, loss: str) -> float | None:
    """Lambda of ``LOSS-calibrated-lLAMBDA``; None for any other setting name."""
    prefix = f"{loss}-calibrated-l"
    try:
        return float(setting[len(prefix) :]) if setting.startswith(prefix) else None
    except ValueError:  # e.g. a renamed variant such as ...-l10-nowarmup
        return None


def _read(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def _append(path: Path, result: dict) -> None:
    """Add one run under a file lock: several sweep processes may share one results file."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / ".results.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        atomic_write_text(path, json.dumps([*_read(path), result], indent=2))


def train_one(base, setting: Setting, seed: int, run_dir: Path, name: str) -> dict:
    from train.evaluate import json_safe
    from train.trainer import Trainer

    cfg = base.replace(**setting.changes(seed))
    start = time.perf_counter()
    metrics = Trainer.from_config(cfg, run_dir, quiet=True, export=False).run()
    seconds = time.perf_counter() - start
    print(
        f"{name}: {seconds:.0f} s, {metrics['steps']} steps, R@1 {metrics['recall_at_1']:.4f} "
        f"OPIS {metrics['opis']:.3e} eps-OPIS {metrics['eps_opis']:.3f}",
        flush=True,
    )
    return {
        "name": name,
        "setting": setting.name,
        "seed": seed,
        "config": setting.changes(seed),
        "seconds": seconds,
        "metrics": json_safe(metrics),
    }


if __name__ == "__main__":
    raise SystemExit(main())
