"""``python -m train.converge``: the convergence matrix, settings x seeds, in one command.

At 1000 steps ProxyAnchor was not converged (held-out Recall@1 still rising 0.8-2.3
points per epoch), so part of TCM's measured OPIS gain was faster training. Here every
run trains until held-out Recall@1 is flat (``patience`` evaluations without a gain of
``min_delta``) or the step cap, then tests and exports its *best* held-out checkpoint.

The matrix is a TOML file (default ``train/configs/converge.toml``): a ``[protocol]``
applied to every setting (step cap, evaluation cadence, patience, best restore), and
``[[setting]]`` entries, each a recipe file plus changes (``set``), and for a TCM
setting the ``base`` setting it is compared with, seed by seed. A run's config is its
recipe file, then the protocol, then its ``set``, then ``--set``, then its seed.

  python -m train.converge --seeds 0 1 2 --jobs 2 --threads-per-job 1
  python -m train.converge --report --figure docs/figures/train_converge.png
  python -m train.converge --dry-run                  # the plan, finished runs marked

Runs are independent processes (``train.jobs``), ``--jobs`` at a time; finished runs
(``OUT/<run>/result.json``) are skipped and interrupted ones resume from their last
checkpoint, so the command can be stopped and rerun at will. ``OUT/results.json`` holds
every run (wall time, steps, best step, held-out curve, test metrics), mean ± std per
setting and the paired changes with their noise (train/sweep.py's aggregation);
``OUT/results.md`` the same as tables; ``OUT/curves.png`` every run's held-out curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contracts import atomic_write_text
from train.config import TrainConfig, load_config, tomllib
from train.jobs import Job, is_finished, read_result, run_jobs
from train.sweep import comparison, parse_overrides, seed_summary, summary

DEFAULT_MATRIX = Path(__file__).resolve().parent / "configs" / "converge.toml"
RUN_KEYS = ("seed", "threads")  # differ between runs by design, never a confound


@dataclass(frozen=True)
class MatrixSetting:
    """One row of the matrix: a recipe file, its changes, and the setting it is paired with."""

    name: str
    config: Path
    changes: dict[str, Any] = field(default_factory=dict)
    base: str | None = None

    def resolve(
        self, protocol: Mapping[str, Any], overrides: Mapping[str, Any], seed: int
    ) -> TrainConfig:
        """Recipe file < protocol < the setting's changes < command-line overrides < seed."""
        cfg = load_config(self.config).replace(**protocol).replace(**self.changes)
        return cfg.replace(**overrides).replace(seed=seed)


@dataclass(frozen=True)
class Matrix:
    """The settings to run and the protocol every one of them shares."""

    protocol: dict[str, Any]
    settings: tuple[MatrixSetting, ...]

    def bases(self) -> dict[str, str]:
        return {s.name: s.base for s in self.settings if s.base}

    def select(self, names: Sequence[str]) -> Matrix:
        """Only the settings named (``--only``); unknown names are an error."""
        unknown = sorted(set(names) - {s.name for s in self.settings})
        if unknown:
            raise ValueError(f"unknown settings {unknown}; the matrix has {self.names()}")
        return Matrix(self.protocol, tuple(s for s in self.settings if s.name in names))

    def names(self) -> list[str]:
        return [s.name for s in self.settings]


def load_matrix(path: Path) -> Matrix:
    """Read a matrix file; recipe paths are relative to the matrix file's folder."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    unknown = sorted(set(data) - {"protocol", "setting"})
    if unknown:
        raise ValueError(f"{path}: unknown tables {unknown}; expected [protocol], [[setting]]")
    protocol = dict(data.get("protocol", {}))
    TrainConfig().replace(**protocol)  # unknown keys fail here, naming the known ones
    settings = []
    for entry in data.get("setting", []):
        extra = sorted(set(entry) - {"name", "config", "set", "base"})
        if extra or "name" not in entry or "config" not in entry:
            raise ValueError(f"{path}: [[setting]] takes name, config, set, base; got {entry}")
        changes = dict(entry.get("set", {}))
        TrainConfig().replace(**changes)
        config = path.parent / entry["config"]
        settings.append(MatrixSetting(entry["name"], config, changes, entry.get("base")))
    names = [s.name for s in settings]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"{path}: setting names must be unique and present, got {names}")
    for s in settings:
        if s.base is not None and s.base not in names:
            raise ValueError(f"{path}: setting {s.name!r} is paired with unknown {s.base!r}")
    return Matrix(protocol, tuple(settings))


def plan(
    matrix: Matrix,
    seeds: Sequence[int],
    out: Path,
    overrides: Mapping[str, Any] | None = None,
    export: bool = True,
) -> list[Job]:
    """One job per setting and seed, seed-major: every setting of seed 0 comes first,
    so a stopped matrix has complete pairs rather than many seeds of one setting."""
    jobs = []
    for seed in seeds:
        for s in matrix.settings:
            cfg = s.resolve(matrix.protocol, overrides or {}, seed)
            info = {"setting": s.name, "seed": seed, "base": s.base}
            name = f"{s.name}-s{seed}"
            jobs.append(Job(name, out / name, cfg, test=True, export=export, info=info))
    return jobs


def confounds(matrix: Matrix, overrides: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """For each pair, the config keys in which the TCM setting differs from its base
    beyond its own ``set`` (e.g. a retuned learning rate): what the pair also compares."""
    by = {s.name: s for s in matrix.settings}
    out = {}
    for s in matrix.settings:
        if s.base is None or s.base not in by:
            continue
        mine = asdict(s.resolve(matrix.protocol, overrides or {}, 0))
        theirs = asdict(by[s.base].resolve(matrix.protocol, overrides or {}, 0))
        ignored = set(RUN_KEYS) | set(s.changes) | set(by[s.base].changes)
        diff = {k: [theirs[k], mine[k]] for k in mine if k not in ignored and mine[k] != theirs[k]}
        if diff:
            out[s.name] = diff
    return out


def provisional(matrix: Matrix) -> list[Path]:
    """Recipe files whose learning rates are still marked PROVISIONAL (not yet tuned)."""
    from train.tune import LR_NOTE

    out = []
    for path in dict.fromkeys(s.config for s in matrix.settings):
        notes = [ln for ln in path.read_text().splitlines() if ln.startswith(LR_NOTE)]
        if any("PROVISIONAL" in ln for ln in notes):
            out.append(path)
    return out


# ---- results ---------------------------------------------------------------------------
def collect(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """The results of the finished jobs, in plan order."""
    return [read_result(j.run_dir) for j in jobs if is_finished(j.run_dir)]


def run_table(results: Sequence[dict[str, Any]]) -> str:
    """Every run: its budget (steps, best step, wall time) and its test metrics."""
    rows = [
        "| run | steps | best step | stopped early | wall (min) | test R@1 | test OPIS "
        "| test eps-OPIS | test TAR@1e-3 | best held-out R@1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"]
        wall = r.get("process_seconds") or r.get("seconds") or 0.0
        best = max((e["recall_at_1"] for e in r["curve"] if e.get("recall_at_1")), default=None)
        rows.append(
            f"| {r['name']} | {r['steps']} | {r['best_step']} | "
            f"{'yes' if r.get('stopped_early') else 'no'} | {wall / 60:.1f} | "
            f"{_fmt(m.get('recall_at_1'), '{:.4f}')} | {_fmt(m.get('opis'), '{:.2e}')} | "
            f"{_fmt(m.get('eps_opis'), '{:.3f}')} | {_fmt(m.get('tar'), '{:.4f}')} | "
            f"{_fmt(best, '{:.4f}')} |"
        )
    return "\n".join(rows)


def _fmt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _compact(result: dict[str, Any]) -> dict[str, Any]:
    """A run as results.json keeps it (the full config stays in the run's own folder)."""
    keys = ("name", "setting", "seed", "base", "seconds", "process_seconds", "steps")
    keys += ("best_step", "stopped_early", "restored_best", "curve", "metrics")
    return {k: result.get(k) for k in keys}


def write_results(
    out: Path, matrix: Matrix, results: list[dict[str, Any]], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """``results.json`` (runs, summary, paired changes), ``results.md`` and ``curves.png``."""
    from train.evaluate import json_safe
    from train.plots import plot_curves

    bases = matrix.bases()
    doc = {
        "protocol": matrix.protocol,
        "overrides": dict(overrides),
        "settings": [
            {"name": s.name, "config": str(s.config), "set": s.changes, "base": s.base}
            for s in matrix.settings
        ],
        "confounds": confounds(matrix, overrides),
        "runs": [_compact(r) for r in results],
        **summary(results, bases),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(json_safe(doc), indent=2))
    md = "\n\n".join(
        [
            "### Every run (test metrics of each run's tested checkpoint)",
            run_table(results),
            "### Mean ± std over seeds (test split)",
            seed_summary(results),
            "### TCM against its base (paired by seed)",
            comparison(results, bases=bases),
        ]
    )
    if doc["confounds"]:
        md += "\n\nPairs that also differ in (base value, TCM value): " + json.dumps(
            doc["confounds"]
        )
    atomic_write_text(out / "results.md", md + "\n")
    if results:
        plot_curves(results, out / "curves.png", title="held-out curves, every run")
    return doc


# ---- command line ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.converge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--matrix", type=Path, default=DEFAULT_MATRIX, help="matrix TOML file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("out/converge"))
    parser.add_argument("--only", nargs="+", default=[], help="run just these settings")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (processes)")
    parser.add_argument("--threads-per-job", type=int, default=1, help="torch/BLAS threads each")
    parser.add_argument("--no-export", action="store_true", help="skip each run's ONNX export")
    parser.add_argument("--report", action="store_true", help="only aggregate finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--figure", type=Path, help="also copy curves.png here (docs/figures)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        matrix = load_matrix(args.matrix)
        if args.only:
            matrix = matrix.select(args.only)
        overrides = parse_overrides(args.set)
        jobs = plan(matrix, args.seeds, args.out, overrides, export=not args.no_export)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in provisional(matrix):
        print(f"warning: {path} has PROVISIONAL learning rates; run python -m train.tune first")
    if args.dry_run:
        for job in jobs:
            state = "finished" if is_finished(job.run_dir) else "to run"
            print(f"{job.name:<40} {state:<9} {job.run_dir}")
        for name, diff in confounds(matrix, overrides).items():
            print(f"note: {name} also differs from its base in {diff}")
        return 0
    failures = [] if args.report else run_jobs(jobs, args.jobs, args.threads_per_job)
    results = collect(jobs)
    write_results(args.out, matrix, results, overrides)
    print((args.out / "results.md").read_text())
    if args.figure and results:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        args.figure.write_bytes((args.out / "curves.png").read_bytes())
    missing = len(jobs) - len(results)
    if missing:
        print(f"{missing} of {len(jobs)} runs not finished ({len(failures)} failed this time)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
