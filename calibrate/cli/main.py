"""``python -m calibrate --target-far 0.001``: calibrate an embedder, write document and report.

Everything is measured and rendered before the first byte is written, so a bad
input (missing model, bad FAR, a dataset with one class, an unmeasurable target)
exits non-zero with a message and leaves no file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import scorenorm
from calibrate.cli.check import CheckFailedError, CheckInsufficientError, run_check
from calibrate.engine.device import DEVICES
from calibrate.engine.sweep import DEFAULT_BLOCK
from calibrate.inputs import InputError, embedded, model_file, tail_level

DEFAULT_OUT = Path("out/calibrate/calibration.json")
EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 3  # --check: a tenant's served FAR interval lies wholly above 2 target
EXIT_CHECK_INSUFFICIENT = 4  # --check: nothing failed, but some row the data cannot decide
EXIT_CODES = f"""\
exit status:
  0  done; with --check: every (dataset, target) row passes
  {EXIT_BAD_INPUT}  bad input or usage (nothing is written)
  {EXIT_CHECK_FAILED}  --check: some row fails (its served FAR interval lies wholly above
     2x target, or with --fail-if-too-safe wholly below target/2)
  {EXIT_CHECK_INSUFFICIENT}  --check: no row fails, but some have insufficient evidence (the
     interval straddles a boundary); each such row says about how many
     pairs and classes would decide it
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m calibrate",
        description="Choose one global similarity threshold per target FAR for an embedder\n"
        "and report how consistent it is across datasets (tenants) and classes.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="embedder .onnx file (default: the shipped default embedder)")
    p.add_argument(
        "--dataset",
        action="append",
        help="calibration data: glyphs, glyphs-tiny, an image folder, cub:/cars:/sop:/inshop:PATH "
        "or precomputed embeddings .npz; repeat for several datasets (default: glyphs, whose "
        "tenants are the datasets)",
    )
    p.add_argument("--split", default="test", choices=("train", "test"), help="split to use")
    p.add_argument(
        "--target-far",
        action="append",
        help="target false-accept rate in (0, 1); repeat or comma-separate (default 0.001)",
    )
    p.add_argument(
        "--far-range",
        nargs=2,
        type=float,
        default=(1e-4, 1e-2),
        metavar=("LO", "HI"),
        help="FAR range whose thresholds bound the OPIS calibration range (default 1e-4 1e-2)",
    )
    p.add_argument("--grid-size", type=int, default=101, help="thresholds in the range for OPIS")
    p.add_argument("--beta", type=float, default=1.0, help="utility weight of TAR against TRR")
    p.add_argument("--eps", type=float, default=0.05, help="share of best/worst for eps-OPIS")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"calibration JSON (default {DEFAULT_OUT})"
    )
    p.add_argument("--plots", type=Path, help="folder for PNG plots (default: next to --out)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="class-bootstrap resamples for confidence intervals of FAR and threshold",
    )
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where to embed and count")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and bootstrap")
    p.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="rows per score block")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide every progress bar (they show only on a terminal; TCM_NO_PROGRESS=1 too)",
    )
    p.add_argument(
        "--normalize",
        default=scorenorm.DEFAULT,
        type=scorenorm.choice(servable_only=True),
        metavar="{" + ",".join(scorenorm.names(servable_only=True)) + "}",
        help="score normalisation the threshold is served with (default "
        f"{scorenorm.DEFAULT}): records it and the global impostor tail it needs, and "
        "reports each dataset's FAR raw and normalised on held-out classes",
    )
    p.add_argument(
        "--check",
        type=Path,
        metavar="CALIBRATION.json",
        help="measure a deployed calibration on new --dataset data without recalibrating; "
        "a verdict per dataset and target: pass when the served FAR's 95%% interval lies "
        "at or below 2x target, fail when wholly above it, else insufficient evidence "
        f"(exit {EXIT_CHECK_FAILED} on any fail, else {EXIT_CHECK_INSUFFICIENT} on any "
        "insufficient, else 0)",
    )
    p.add_argument(
        "--fail-if-too-safe",
        action="store_true",
        help="with --check: pass needs the interval inside [target/2, 2x target], and one "
        "wholly below target/2 fails too (by default a FAR below target is accepted)",
    )
    p.add_argument(
        "--target-fpir",
        type=float,
        metavar="F",
        help="calibrate for a per-search false positive identification rate F at "
        "--gallery-size N instead of a per-pair FAR (per-pair a = 1 - (1 - F)^(1/N))",
    )
    p.add_argument(
        "--gallery-size",
        type=int,
        metavar="N",
        help="also measure each dataset's FPIR with galleries of N items (held-out classes)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="share the pair counting among the processes of torchrun (torch.distributed, "
        "gloo); same numbers as one process, only rank 0 prints and writes",
    )
    return p


def parse_fars(values: list[str] | None) -> list[float]:
    if not values:
        return [1e-3]
    fars = []
    for v in values:
        for part in v.split(","):
            try:
                a = float(part)
            except ValueError as err:
                raise InputError(f"--target-far {part!r} is not a number; e.g. 0.001") from err
            if not 0.0 < a < 1.0:
                raise InputError(f"--target-far must lie in (0, 1), got {part}; e.g. 0.001")
            fars.append(a)
    return fars


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.no_progress:
        from contracts.progress import silence

        silence()  # every bar: embedding, pairs, and rendering a dataset not cached yet
    try:
        run(args)
    except CheckFailedError as err:
        print(f"check failed: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except CheckInsufficientError as err:
        print(f"check undecided, insufficient evidence: {err}", file=sys.stderr)
        return EXIT_CHECK_INSUFFICIENT
    except InputError as err:
        if not args.distributed or os.environ.get("RANK", "0") == "0":  # one message per run
            print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def run(args: argparse.Namespace) -> None:
    if args.check is not None:
        run_check(args)
        return
    if args.fail_if_too_safe:
        raise InputError("--fail-if-too-safe goes with --check CALIBRATION.json")
    fars = _operating_points(args)
    sources = args.dataset or ["glyphs"]
    if args.model is None and any(s.endswith(".npz") for s in sources):
        raise InputError(
            "--model is required with precomputed embeddings (.npz): the calibration is "
            "bound to the model that made them, pass that .onnx file"
        )
    rank, joined = _join_group() if args.distributed else (0, False)
    try:
        _run_on(args, fars, sources, rank)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _operating_points(args: argparse.Namespace) -> list[float]:
    """Per-pair target FARs: --target-far, or the one a --target-fpir implies at N items."""
    if args.gallery_size is not None and args.gallery_size < 1:
        raise InputError(f"--gallery-size must be >= 1 items, got {args.gallery_size}")
    if args.target_fpir is None:
        return parse_fars(args.target_far)
    if args.gallery_size is None:
        raise InputError("--target-fpir needs --gallery-size N: FPIR is per search of N items")
    if args.target_far:
        raise InputError("give --target-far (per pair) or --target-fpir (per search), not both")
    from calibrate.heldout.fpir import per_pair_far

    try:
        return [per_pair_far(args.target_fpir, args.gallery_size)]
    except ValueError as err:
        raise InputError(str(err)) from err


def _run_on(args: argparse.Namespace, fars: list[float], sources: list[str], rank: int) -> None:
    from calibrate.engine.evaluate import evaluate
    from calibrate.engine.prepare import CalibrationInputError
    from calibrate.reports.outputs import write_outputs

    progress = not args.no_progress and rank == 0
    model = model_file(args.model)

    def embed_all():
        return [embedded(s, args.split, model, args.device, progress) for s in sources]

    sets = _from_rank0(embed_all) if args.distributed else embed_all()
    data = sets[0] if len(sets) == 1 else sets
    level = tail_level(fars, tuple(args.far_range))
    try:
        ev = evaluate(
            data,
            fars,
            far_range=tuple(args.far_range),
            grid_size=args.grid_size,
            beta=args.beta,
            eps=args.eps,
            bootstrap=args.bootstrap,
            seed=args.seed,
            device=args.device,
            progress=progress,
            block=args.block,
            distributed=args.distributed,
            tail_level=level,
        )
    except (CalibrationInputError, ValueError) as err:
        raise InputError(str(err)) from err
    bad = [t for t in ev.targets if not t.measurable]
    if bad:
        raise InputError("; ".join(t.warnings[0] for t in bad) + ". Nothing was written.")
    if rank != 0:
        return
    from calibrate.heldout.serving import Served, serving_report
    from calibrate.reports.report import table

    settings = scorenorm.TailSettings(top_level=level)
    served = Served(args.normalize, settings, args.gallery_size, args.target_fpir)
    extra = serving_report(
        data,
        ev,
        served,
        seed=args.seed,
        bootstrap=max(args.bootstrap, 200),
        progress=progress,
        held_out_far=args.normalize != "none",  # raw alone: the engine's table says it all
    )
    print(table(ev))
    print(extra.text())
    written = write_outputs(ev, model, sources, args.out, args.plots, extra)
    print("\nwrote " + ", ".join(str(p) for p in written))


def _join_group() -> tuple[int, bool]:
    """(rank, joined here): torchrun's group, joined with gloo unless the caller did."""
    try:
        import torch.distributed as dist
    except ImportError as err:
        raise InputError("--distributed needs torch: pip install '.[train]'") from err
    joined = not dist.is_initialized()
    if joined:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise InputError(
                "--distributed runs under torchrun, e.g. "
                "torchrun --nproc_per_node 2 -m calibrate --distributed --target-far 0.001"
            )
        dist.init_process_group("gloo")
    return dist.get_rank(), joined


def _from_rank0(make):
    """Rank 0 embeds the datasets once and sends them to every rank (same inputs everywhere)."""
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", make())
        except InputError as err:
            box[0] = ("error", str(err))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise InputError(value)
    return value
