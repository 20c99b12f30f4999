"""``python -m train.sweep``: rerun the reproduction table (base loss vs base loss + TCM).

Every (base loss, seed) pair trains twice with the same data, steps and seed, once
without and once with TCM; then a margin/lambda sweep with the first loss and seed.
Every run is reported (docs/RESULTS.md), not only the best. Results go to
``OUT/results.json`` and a Markdown table on stdout and in ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from contracts import atomic_write_text
from train.config import load_config
from train.trainer import Trainer, json_safe

DEFAULT_MARGINS = ["0.9,0.5,1,1", "0.8,0.4,1,1", "0.9,0.5,1,3"]
COLUMNS = ("recall_at_1", "map_at_r", "opis", "eps_opis", "far_min", "far_max", "far_spread")


def _runs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    runs = []
    for loss in args.losses:
        for seed in args.seeds:
            for tcm in (False, True):
                name = f"{loss}{'-tcm' if tcm else ''}-s{seed}"
                runs.append((name, {"loss": loss, "seed": seed, "tcm": tcm}))
    for spec in args.margins:
        mp, mm, lp, lm = (float(v) for v in spec.split(","))
        if (mp, mm, lp, lm) == (0.9, 0.5, 1.0, 1.0):
            continue  # already in the main table
        name = f"{args.losses[0]}-tcm-s{args.seeds[0]}-m{mp:g},{mm:g}-l{lp:g},{lm:g}"
        runs.append(
            (
                name,
                {
                    "loss": args.losses[0],
                    "seed": args.seeds[0],
                    "tcm": True,
                    "margin_plus": mp,
                    "margin_minus": mm,
                    "lambda_plus": lp,
                    "lambda_minus": lm,
                },
            )
        )
    return runs


def table(results: list[dict]) -> str:
    head = "| run | " + " | ".join(COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in results:
        cells = []
        for c in COLUMNS:
            v = r["metrics"].get(c)
            cells.append("n/a" if v is None else f"{v:.4f}" if c in COLUMNS[:2] else f"{v:.3g}")
        rows.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary(results: list[dict]) -> str:
    """Per base loss: seed means without and with TCM, and TCM's relative change."""
    lines = [
        "| base loss | seeds | R@1 base | R@1 +TCM | OPIS base | OPIS +TCM | OPIS change |"
        " eps-OPIS change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    main_runs = [r for r in results if "margin_plus" not in r["config"]]
    for loss in dict.fromkeys(r["config"]["loss"] for r in main_runs):
        pairs = {}
        for r in main_runs:
            if r["config"]["loss"] == loss:
                pairs.setdefault(r["config"]["seed"], {})[r["config"]["tcm"]] = r["metrics"]
        both = [p for p in pairs.values() if True in p and False in p]
        if not both:
            continue

        def mean(key: str, tcm: bool, runs=both) -> float:
            return sum(p[tcm][key] for p in runs) / len(runs)

        r0, r1 = mean("recall_at_1", False), mean("recall_at_1", True)
        o0, o1 = mean("opis", False), mean("opis", True)
        e0, e1 = mean("eps_opis", False), mean("eps_opis", True)
        lines.append(
            f"| {loss} | {len(both)} | {r0:.4f} | {r1:.4f} | {o0:.3g} | {o1:.3g} | "
            f"{(o1 - o0) / o0:+.0%} | {(e1 - e0) / e0:+.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("train/configs/default.toml"))
    parser.add_argument("--out", type=Path, default=Path("out/sweep"))
    parser.add_argument("--losses", nargs="+", default=["multi_similarity", "proxy_anchor"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150, help="steps per epoch")
    parser.add_argument("--eval-limit", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--margins",
        nargs="*",
        default=DEFAULT_MARGINS,
        help="margin_plus,margin_minus,lambda_plus,lambda_minus per sweep run",
    )
    parser.add_argument("--figures", type=Path, help="also write the figures to this folder")
    args = parser.parse_args(argv)
    base = load_config(args.config).replace(
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        eval_every=args.epochs,
        eval_limit=args.eval_limit,
        threads=args.threads,
    )
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {r["name"] for r in results}
    for name, changes in _runs(args):
        if name in done:
            print(f"{name}: already in {results_path}, skipped")
            continue
        cfg = base.replace(**changes)
        start = time.perf_counter()
        metrics = Trainer(cfg, args.out / name, quiet=True, export=False).run()
        seconds = time.perf_counter() - start
        results.append(
            {"name": name, "config": changes, "seconds": seconds, "metrics": json_safe(metrics)}
        )
        print(
            f"{name}: {seconds:.0f} s  R@1 {metrics['recall_at_1']:.4f} OPIS {metrics['opis']:.3e}"
        )
        atomic_write_text(results_path, json.dumps(results, indent=2))
    if args.figures:
        from train.plots import plot_sweep, plot_utility_pair

        args.figures.mkdir(parents=True, exist_ok=True)
        for loss in args.losses:
            seed = args.seeds[0]
            plot_utility_pair(
                args.out / f"{loss}-s{seed}",
                args.out / f"{loss}-tcm-s{seed}",
                args.figures / f"train_utility_{loss}.png",
            )
        plot_sweep(results, args.figures / "train_sweep.png")
    md = table(results) + "\n\n" + summary(results)
    atomic_write_text(args.out / "results.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
