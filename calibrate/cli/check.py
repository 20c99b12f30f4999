"""``python -m calibrate --check CALIBRATION.json --dataset NEW``: does a deployed threshold hold?

A new customer arrives with data the calibration never saw. Without recalibrating,
this measures the deployed thresholds on it: per dataset (tenant) the FAR at the
deployed threshold on all its pairs, its own threshold for the same target and the
drift between them, OPIS; and, on held-out classes, the FAR raw and with the
document's normalisation, each with a class-bootstrap interval. Each (dataset,
target) row of the served scores gets a verdict (calibrate/heldout/verdict.py): pass,
fail or insufficient evidence; the run exits with the worst of them (main.py's exit
codes: 0, ``EXIT_CHECK_FAILED``, ``EXIT_CHECK_INSUFFICIENT``), so it can gate a deploy.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from calibrate.inputs import InputError, embedded, model_file, tail_level
from contracts import CalibrationError, load_calibration
from scorenorm import TailSettings


class CheckFailedError(Exception):
    """--check found a dataset off target; the table above says which."""


class CheckInsufficientError(Exception):
    """--check found no dataset off target, but some it could not decide on this data."""


def run_check(args: argparse.Namespace) -> None:
    from calibrate.engine.evaluate import evaluate
    from calibrate.engine.prepare import CalibrationInputError
    from calibrate.heldout.serving import Served, serving_report
    from calibrate.heldout.verdict import FAIL, INSUFFICIENT, PASS, overall
    from calibrate.reports.report import table

    if not args.dataset:
        raise InputError("--check needs the new data: --dataset PATH (repeatable)")
    if args.target_far or args.target_fpir is not None:
        raise InputError("--check measures the document's own targets; drop --target-far/-fpir")
    try:
        doc = load_calibration(args.check)
    except CalibrationError as err:
        raise InputError(str(err)) from err
    model = _resolve_model(args, doc)
    targets = doc.targets()
    if not targets:
        raise InputError(f"{args.check} holds no measurable target to check")
    norm = doc.normalization()
    method = norm.method if norm else "none"
    progress = not args.no_progress
    sets = [embedded(s, args.split, model, args.device, progress) for s in args.dataset]
    data = sets[0] if len(sets) == 1 else sets
    fars = [t.target_far for t in targets]
    try:
        ev = evaluate(
            data,
            fars,
            far_range=tuple(doc.raw["settings"]["far_range"]),
            grid_size=doc.raw["settings"]["grid_size"],
            beta=doc.raw["settings"]["beta"],
            eps=doc.raw["settings"]["eps"],
            seed=args.seed,
            device=args.device,
            progress=progress,
            block=args.block,
            thresholds=[t.threshold for t in targets],
            tail_level=tail_level(fars, tuple(doc.raw["settings"]["far_range"])),
        )
    except (CalibrationInputError, ValueError) as err:
        raise InputError(str(err)) from err
    # map onto the deployed global tail, never onto the new data's own
    ev = replace(ev, global_tail=norm.global_tail if norm else None)
    settings = norm.settings if norm else TailSettings()
    served = Served(method, settings, args.gallery_size)
    report = serving_report(
        data,
        ev,
        served,
        seed=args.seed,
        bootstrap=max(args.bootstrap, 200),
        thresholds={t.target_far: t.threshold for t in targets},
        progress=progress,
    )
    print(f"checking {args.check} (served: {method}) on {', '.join(args.dataset)}")
    print("deployed thresholds measured on the new data (FAR ratio = FAR / target):")
    print(table(ev))
    if norm is None:
        print(
            "\nno normalisation section in the document: the held-out columns are raw only "
            "(calibrate with --normalize tenant-tail to serve normalised scores)"
        )
    verdicts = report.verdicts(fail_if_too_safe=args.fail_if_too_safe)
    print(report.text(verdicts))
    band = "[target/2, 2x target]" if args.fail_if_too_safe else "<= 2x target"
    counts = {k: sum(v.verdict.verdict == k for v in verdicts) for k in (PASS, FAIL, INSUFFICIENT)}
    print(
        f"\nverdicts ({method} FAR {band} on the 95% interval): {counts[PASS]} pass, "
        f"{counts[FAIL]} fail, {counts[INSUFFICIENT]} insufficient evidence"
    )
    verdict = overall(v.verdict.verdict for v in verdicts)
    if verdict == FAIL:
        bad = [v for v in verdicts if v.verdict.verdict == FAIL]
        raise CheckFailedError("; ".join(v.summary() for v in bad))
    if verdict == INSUFFICIENT:
        open_ = [v for v in verdicts if v.verdict.verdict == INSUFFICIENT]
        raise CheckInsufficientError(
            "; ".join(f"{v.dataset} at target FAR {v.target_far:g}" for v in open_)
        )
    print(f"check passed: every dataset's {method} FAR is {band} at every target")


def _resolve_model(args: argparse.Namespace, doc) -> Path:
    model = model_file(args.model)
    try:
        doc.check_model(model)
    except CalibrationError as err:
        raise InputError(f"{err} (pass the model the document was made for with --model)") from err
    return model
