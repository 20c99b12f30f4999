"""``python -m train.tune``: choose a base loss's learning rates on the held-out classes.

Each candidate (backbone ``lr`` x loss ``proxy_lr``) trains a short run of the loss's
recipe (default 800 steps, evaluated every 100) on the training classes, and is scored
by the best Recall@1 it reached on the held-out train classes (``val_fraction``),
averaged over ``--seeds``. The test split is never loaded, so the choice cannot leak
into the test numbers the convergence matrix reports.

ProxyAnchor's proxies are parameters of the loss, and the usual recipe (Kim et al.
2020; PML's docs) gives them a learning rate ~100x the backbone's: ``proxy_lr`` is
their own optimizer parameter group. Losses without parameters (MultiSimilarity) tune
``lr`` alone.

  python -m train.tune --loss proxy_anchor --lrs 1e-3 2e-3 4e-3 --proxy-lrs 1e-2 1e-1 1
  python -m train.tune --loss multi_similarity --lrs 1e-3 2e-3 4e-3 --write-config

``OUT/tune.json`` holds every candidate's held-out curve, its score and the choice;
``OUT/tune.png`` draws the curves; ``--write-config`` puts the chosen rates into the
config file (``train/configs/converge_<loss>.toml`` by default). Short runs decay
their cosine schedule over the short budget, so they rank rates, not final accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contracts import atomic_write_text
from train.config import TrainConfig, load_config
from train.jobs import Job, read_result, run_jobs

CONFIGS = Path(__file__).resolve().parent / "configs"
LR_NOTE = "# learning rates:"  # the config line that says where its rates come from


def default_config(loss: str) -> Path:
    """``train/configs/converge_<loss>.toml``: the recipe each base loss is tuned and run with."""
    return CONFIGS / f"converge_{loss}.toml"


def loss_has_parameters(cfg: TrainConfig) -> bool:
    """Whether ``proxy_lr`` matters: the base loss owns trainable parameters (proxies)."""
    from train.base_losses import build_losses

    losses = build_losses(cfg.loss, 2, cfg.embedding_dim, cfg.loss_params)
    return any(p.requires_grad for loss in losses.values() for p in loss.parameters())


def short_config(cfg: TrainConfig, steps: int, eval_steps: int) -> TrainConfig:
    """The recipe cut to ``steps`` (whole evaluations of ``eval_steps``), run to the end.

    No early stopping and no best-checkpoint restore: every candidate gets the same
    budget, and its whole curve is kept for the choice and the figure.
    """
    if steps < 1 or eval_steps < 1:
        raise ValueError(f"--steps and --eval-steps must be >= 1, got {steps}, {eval_steps}")
    if cfg.val_fraction <= 0:
        raise ValueError("tuning scores held-out train classes: the config needs val_fraction > 0")
    return cfg.replace(
        epochs=math.ceil(steps / eval_steps),
        steps_per_epoch=eval_steps,
        eval_every=1,
        patience=0,
        restore_best=False,
    )


def candidate_label(lr: float, proxy_lr: float | None) -> str:
    """``lr0.002-plr0.1``: names a candidate's runs and its line in the figure."""
    return f"lr{lr:g}" + ("" if proxy_lr is None else f"-plr{proxy_lr:g}")


def plan(
    cfg: TrainConfig,
    lrs: Sequence[float],
    proxy_lrs: Sequence[float | None],
    seeds: Sequence[int],
    out: Path,
) -> list[Job]:
    """One job per (lr, proxy_lr, seed); never tested, never exported."""
    jobs = []
    for seed in seeds:
        for lr in lrs:
            for plr in proxy_lrs:
                changes: dict[str, Any] = {"lr": lr, "seed": seed}
                if plr is not None:
                    changes["proxy_lr"] = plr
                label = candidate_label(lr, plr)
                info = {"setting": label, "seed": seed, "lr": lr, "proxy_lr": plr}
                name = f"{label}-s{seed}"
                jobs.append(Job(name, out / name, cfg.replace(**changes), False, False, info))
    return jobs


def score(result: dict[str, Any]) -> float:
    """A run's score: its best held-out Recall@1 over the evaluations (nan: none)."""
    values = [e["recall_at_1"] for e in result["curve"] if e.get("recall_at_1") is not None]
    return max(values) if values else math.nan


def choose(results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(candidates, choice): each (lr, proxy_lr) with its mean score over seeds; the best.

    Ties (equal mean best Recall@1) go to the higher mean last Recall@1, then to the
    smaller learning rates (the safer side for longer runs).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["lr"], r["proxy_lr"]), []).append(r)
    candidates = []
    for (lr, plr), runs in groups.items():
        last = [r["curve"][-1]["recall_at_1"] for r in runs if r["curve"]]
        best = [s for s in map(score, runs) if not math.isnan(s)]
        candidates.append(
            {
                "lr": lr,
                "proxy_lr": plr,
                "seeds": sorted(r["seed"] for r in runs),
                "score": statistics.fmean(best) if best else None,
                "last_recall_at_1": statistics.fmean(last) if last else None,
                "best_steps": [r["best_step"] for r in runs],
                "seconds": [r["seconds"] for r in runs],
                "curves": {str(r["seed"]): r["curve"] for r in runs},
            }
        )
    ranked = [c for c in candidates if c["score"] is not None]
    if not ranked:
        raise ValueError("no candidate has a held-out evaluation to choose by")
    best = max(
        ranked,
        key=lambda c: (c["score"], c["last_recall_at_1"] or 0.0, -c["lr"], -(c["proxy_lr"] or 0)),
    )
    return candidates, {"lr": best["lr"], "proxy_lr": best["proxy_lr"], "score": best["score"]}


def set_toml_values(text: str, values: dict[str, float], note: str | None = None) -> str:
    """``text`` with each ``key = value`` line of ``values`` rewritten, comments kept.

    Every key must already be in the file (a tuned rate is never added silently to a
    file that does not use it); ``note`` replaces the ``# learning rates:`` line.
    """
    for key, value in values.items():
        pattern = re.compile(rf"^(\s*{re.escape(key)}\s*=\s*)[^#\n]*?(\s*#.*)?$", re.MULTILINE)
        text, n = pattern.subn(lambda m, v=value: f"{m.group(1)}{v!r}{m.group(2) or ''}", text)
        if n != 1:
            raise ValueError(f"expected one '{key} = ...' line in the config, found {n}")
    if note is not None:
        text, n = re.subn(rf"^{re.escape(LR_NOTE)}.*$", f"{LR_NOTE} {note}", text, flags=re.M)
        if n == 0:
            text = f"{LR_NOTE} {note}\n{text}"
    return text


def write_choice(path: Path, choice: dict[str, Any], tune_json: Path) -> None:
    """Put the chosen rates into the config file the candidates were trained from."""
    values = {"lr": choice["lr"]}
    if choice["proxy_lr"] is not None:
        values["proxy_lr"] = choice["proxy_lr"]
    note = (
        f"chosen by python -m train.tune on held-out Recall@1 ({tune_json}, "
        f"{time.strftime('%Y-%m-%d')})"
    )
    atomic_write_text(path, set_toml_values(path.read_text(), values, note))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--loss", help="base loss; its config is train/configs/converge_LOSS.toml")
    parser.add_argument("--config", type=Path, help="recipe to tune (default: from --loss)")
    parser.add_argument("--lrs", type=float, nargs="+", required=True, help="backbone rates")
    parser.add_argument(
        "--proxy-lrs", type=float, nargs="+", help="loss-parameter rates (losses with proxies)"
    )
    parser.add_argument("--steps", type=int, default=800, help="steps per candidate run")
    parser.add_argument("--eval-steps", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, help="default out/tune/<loss>")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (processes)")
    parser.add_argument("--threads-per-job", type=int, default=1)
    parser.add_argument(
        "--write-config", action="store_true", help="write the chosen rates into the config"
    )
    return parser


def _resolve(args: argparse.Namespace) -> tuple[Path, TrainConfig]:
    path = args.config or (default_config(args.loss) if args.loss else None)
    if path is None:
        raise ValueError("give --loss or --config")
    cfg = load_config(path)
    if args.loss and cfg.loss != args.loss:
        raise ValueError(f"{path} trains {cfg.loss!r}, not --loss {args.loss!r}")
    return path, cfg


def main(argv: list[str] | None = None) -> int:
    from train.plots import plot_curves

    args = build_parser().parse_args(argv)
    try:
        path, cfg = _resolve(args)
        cfg = short_config(cfg, args.steps, args.eval_steps)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    proxy_lrs: list[float | None] = list(args.proxy_lrs or [None])
    if args.proxy_lrs and not loss_has_parameters(cfg):
        print(f"error: {cfg.loss} has no parameters of its own: drop --proxy-lrs", file=sys.stderr)
        return 2
    out = args.out or Path("out/tune") / cfg.loss
    jobs = plan(cfg, args.lrs, proxy_lrs, args.seeds, out)
    failures = run_jobs(jobs, args.jobs, args.threads_per_job)
    results = [read_result(j.run_dir) for j in jobs if (j.run_dir / "result.json").is_file()]
    if failures or len(results) < len(jobs):
        print(f"{len(jobs) - len(results)} of {len(jobs)} candidate runs did not finish")
        return 1
    candidates, choice = choose(results)
    doc = {
        "config": str(path),
        "loss": cfg.loss,
        "steps": cfg.epochs * cfg.steps_per_epoch,
        "eval_steps": cfg.steps_per_epoch,
        "seeds": args.seeds,
        "criterion": "best held-out Recall@1 over the evaluations (validation train classes; "
        "the test split is never loaded), mean over seeds",
        "choice": choice,
        "candidates": candidates,
    }
    atomic_write_text(out / "tune.json", json.dumps(doc, indent=2))
    plot_curves(results, out / "tune.png", title=f"{cfg.loss}: learning-rate candidates")
    plr = "" if choice["proxy_lr"] is None else f", proxy_lr {choice['proxy_lr']:g}"
    print(f"chosen: lr {choice['lr']:g}{plr} (held-out R@1 {choice['score']:.4f}); {out}/tune.json")
    if args.write_config:
        write_choice(path, choice, out / "tune.json")
        print(f"wrote the chosen rates into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
