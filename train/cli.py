"""``python -m train``: train a (TCM-regularised) embedder; ``python -m train export``.

Settings come from a TOML config (default: train/configs/default.toml); every config
key is also a flag (``--margin-plus 0.8``, ``--no-tcm``) that overrides the file.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from train.config import TrainConfig, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.toml"
# docs/CALIBRATION.md, "Shipped calibration": the one command that remakes the shipped JSON
RECALIBRATE_DEFAULT = (
    "python -m calibrate --target-far 0.001 --target-far 0.0001,0.01 --bootstrap 200 "
    "--out embedding/assets/glyphnet.calibration.json"
)
TINY = {
    "dataset": "glyphs-tiny",
    "epochs": 1,
    "steps_per_epoch": 3,
    "batch_size": 32,
    "width": 8,
    "embedding_dim": 16,
    "eval_limit": 0,
}
HELP = {
    "dataset": "glyphs (default), glyphs-tiny, an image folder, or cub:/cars:/sop:/inshop:PATH",
    "m_per_class": "images per class in a batch (PML MPerClassSampler)",
    "workers": "data-loader worker processes",
    "backbone": "a registered backbone (see --list), timm:NAME or torchvision:NAME",
    "weights": "local state-dict file for timm/torchvision backbones (never downloaded)",
    "width": "glyphnet channel width",
    "loss": "registered base loss (see --list), or none (TCM alone)",
    "tcm": "add the TCM regulariser to the base loss",
    "steps_per_epoch": "0 = one pass over the train split",
    "proxy_lr": "learning rate of the base loss's own parameters (ProxyAnchor proxies, "
    "ArcFace class centres): their own optimizer parameter group",
    "schedule": "cosine or constant",
    "amp": "float16 autocast (CUDA only)",
    "device": "auto, cpu or cuda (cuda without a GPU falls back to cpu with a message)",
    "threads": "torch CPU threads",
    "eval_limit": "evaluate on whole test classes up to this many images (0 = all)",
    "target_far": "global FAR whose threshold the per-tenant FARs are reported at",
    "val_fraction": "train classes held out (per tenant) for validation and calibrated margins; "
    "0 = none",
    "margins": "TCM margins: fixed (--margin-plus/--margin-minus) or calibrated (follow the "
    "model's operating range on the held-out classes)",
    "margin_every": "steps between operating-range measurements (--margins calibrated)",
    "margin_warmup": "steps trained with the fixed margins before the first measurement "
    "(a random network's range is ~[1, 1])",
    "margin_offset": "calibrated margins: m- = t(FAR hi) - offset, m+ = t(FAR lo) + offset",
    "margin_momentum": "smoothing of calibrated margins between measurements (0 = none)",
    "margin_far_lo": "calibrated margins: the strict end of the operating range (FAR)",
    "margin_far_hi": "calibrated margins: the loose end of the operating range (FAR)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "patience": "stop after this many evaluations without a held-out Recall@1 gain (0 = off)",
    "min_delta": "held-out Recall@1 gain that counts as progress for --patience",
    "restore_best": "test and export the weights of the best held-out evaluation, not the last "
    "(kept in RUN_DIR/best.pt)",
    "optimizer": "registered optimizer (see --list)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Export an existing run: python -m train export RUN_DIR --out model.onnx",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="TOML config file (default: train/configs/default.toml)",
    )
    parser.add_argument("--out", type=Path, help="run directory (default out/train/<run name>)")
    parser.add_argument("--resume", type=Path, help="continue the run in this directory")
    parser.add_argument(
        "--export-default",
        action="store_true",
        help="also copy the final model.onnx to embedding/assets/glyphnet.onnx",
    )
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run on glyphs-tiny")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the registered losses, backbones, optimizers and datasets, then exit",
    )
    opts = parser.add_argument_group("config overrides (defaults shown are the built-in ones)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        text = HELP.get(f.name, f.name.replace("_", " "))
        if f.name == "loss_params":
            opts.add_argument(
                "--loss-param",
                dest="loss_params",
                action="append",
                metavar="KEY=VALUE",
                default=argparse.SUPPRESS,
                help="base loss parameter, repeatable (e.g. --loss-param margin=0.2)",
            )
        elif isinstance(default, bool):
            opts.add_argument(
                _flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{text} (built-in: {default})",
            )
        else:
            opts.add_argument(
                _flag(f.name),
                dest=f.name,
                type=type(default),
                default=argparse.SUPPRESS,
                help=f"{text} (built-in: {default})",
            )
    return parser


def _loss_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--loss-param expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """File, then --tiny, then explicit flags: later wins."""
    base = args.resume / "config.json" if args.resume else args.config
    cfg = load_config(base)
    if args.tiny:
        cfg = cfg.replace(**TINY)
    overrides = {
        f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)
    }
    if "loss_params" in overrides:
        overrides["loss_params"] = {**cfg.loss_params, **_loss_params(overrides["loss_params"])}
    return cfg.replace(**overrides)


def run_name(cfg: TrainConfig) -> str:
    tcm = "-tcm" if cfg.tcm else ""
    return f"{cfg.loss}{tcm}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_registered() -> None:
    """What ``--list`` prints: every registry, one name per line with its summary."""
    from train.registry import REGISTRIES

    for kind, registry in REGISTRIES.items():
        print(f"{kind}:")
        for name, doc in registry.describe().items():
            print(f"  {name:<18} {doc}")


def train_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print_registered()
        return 0
    try:
        cfg = resolve_config(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from train.trainer import Trainer

    run_dir = args.resume or args.out or Path("out/train") / run_name(cfg)
    try:
        trainer = Trainer.from_config(cfg, run_dir, quiet=args.quiet)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.resume:
        ckpt = args.resume / "checkpoint.pt"
        if not ckpt.is_file():
            print(f"error: {ckpt} does not exist; nothing to resume", file=sys.stderr)
            return 2
        trainer.load_checkpoint(ckpt)
    metrics = trainer.run()
    if args.export_default and trainer.rank == 0:
        from embedding.defaults import DEFAULT_MODEL

        shutil.copyfile(run_dir / "model.onnx", DEFAULT_MODEL)
        print(f"default embedder updated: {DEFAULT_MODEL}")
        print(f"its calibration is now stale; recalibrate it with\n  {RECALIBRATE_DEFAULT}")
    if metrics:
        keys = ("recall_at_1", "map_at_r", "opis", "eps_opis", "tar", "far_min", "far_max")
        print(" ".join(f"{k}={metrics[k]:.4g}" for k in keys if metrics.get(k) is not None))
    return 0


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train export",
        description="Export a run's last checkpoint to ONNX (parity-checked, with metadata).",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="default RUN_DIR/model.onnx")
    args = parser.parse_args(argv)
    ckpt = args.run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        print(f"error: {ckpt} not found: train first (python -m train --out DIR)", file=sys.stderr)
        return 2
    import torch

    from train.export import export_model
    from train.models import build_model
    from train.trainer import recipe_of

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg.backbone, cfg.embedding_dim, cfg.width)
    model.load_state_dict(state["model"])
    out = args.out or args.run_dir / "model.onnx"
    export_model(model, out, recipe_of(cfg, _last_margins(state)))
    print(f"wrote {out}")
    return 0


def _last_margins(state: dict) -> dict[str, float] | None:
    """The TCM margins in force at the checkpoint, from its step history."""
    for row in reversed(state.get("history", [])):
        if "tcm/margin_plus" in row:
            return {"margin_plus": row["tcm/margin_plus"], "margin_minus": row["tcm/margin_minus"]}
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    return train_main(argv)
