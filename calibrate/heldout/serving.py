"""What a calibration promises once served: held-out FAR raw vs normalised, and 1:N FPIR.

The engine's numbers are exact but in-sample (every pair of the calibration set). A
served tenant sees its own gallery and new queries, so next to them a calibration
reports, per dataset, the FAR on held-out classes at the global threshold, raw and
with the normalisation it will be served with (calibrate/heldout/normalized.py), and, given a
gallery size, the per-search false positive identification rate (calibrate/heldout/fpir.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from calibrate.engine.results import Evaluation
from calibrate.heldout.fpir import DatasetFpir, held_out_fpir, independent_fpir
from calibrate.heldout.normalized import (
    MIN_CLASSES,
    DatasetHeldOut,
    TargetHeldOut,
    held_out,
    rows_for_document,
)
from calibrate.heldout.verdict import FAIL, INSUFFICIENT, PASS, Verdict, decide
from imagesets import EmbeddingSet
from scorenorm import TailSettings


@dataclass(frozen=True)
class Served:
    """How the threshold will be served."""

    method: str  # score normalisation (scorenorm registry name)
    settings: TailSettings
    gallery_size: int | None = None  # measure FPIR at this many items
    target_fpir: float | None = None  # the threshold was chosen for this FPIR


@dataclass(frozen=True)
class RowVerdict:
    """The --check verdict on one dataset at one target, with the counts it rests on."""

    target_far: float
    dataset: str
    accepted: int
    pairs: int
    classes: int
    verdict: Verdict

    def line(self) -> str:
        """Why a row did not pass, and what would decide it."""
        v = self.verdict
        text = f"{v.reason} ({self.accepted:,} of {self.pairs:,} pairs accepted)"
        if v.verdict == INSUFFICIENT:
            text += "; " + (
                v.need.text(self.pairs, self.classes) if v.need else "no amount of data decides it"
            )
        return text

    def summary(self) -> str:
        """One line for the exit message."""
        v = self.verdict
        interval = v.ratio_text(self.target_far)
        counted = f"{self.accepted:,} of {self.pairs:,} pairs accepted"
        return (
            f"{self.dataset} at target FAR {self.target_far:g}: {interval} x target "
            f"{v.reason} ({counted})"
        )


@dataclass
class ServingReport:
    served: Served
    held_out: list[TargetHeldOut] | None
    fpir: dict[float, list[DatasetFpir]] | None

    def normalization_section(self) -> dict[str, Any]:
        return {"method": self.served.method, "settings": self.served.settings.to_json()}

    def held_out_rows(self) -> dict[float, dict[str, dict]] | None:
        return rows_for_document(self.held_out) if self.held_out else None

    def fpir_rows(self) -> dict[float, dict[str, Any]] | None:
        if not self.fpir:
            return None
        return {
            a: {
                "gallery_size": self.served.gallery_size,
                "target_fpir": self.served.target_fpir,
                "independent_pairs_fpir": independent_fpir(a, self.served.gallery_size or 1),
                "datasets": [
                    {
                        "name": d.name,
                        "gallery_size": d.gallery_size,
                        "raw": d.raw.to_json(),
                        "normalized": d.normalized.to_json() if d.normalized else None,
                    }
                    for d in rows
                ],
            }
            for a, rows in self.fpir.items()
        }

    def served_far(self, d: DatasetHeldOut):
        """The column the threshold is served with: normalised unless served raw."""
        return d.normalized if self.served.method != "none" else d.raw

    def verdicts(self, fail_if_too_safe: bool = False) -> list[RowVerdict]:
        """Per (target, dataset), the verdict on its served held-out FAR (heldout/verdict.py)."""
        out = []
        for r in self.held_out or []:
            for d in r.datasets:
                far = self.served_far(d)
                v = decide(
                    far.accepted,
                    far.pairs,
                    far.ci,
                    r.target_far,
                    classes=d.classes,
                    min_classes=MIN_CLASSES,
                    fail_if_too_safe=fail_if_too_safe,
                )
                out.append(RowVerdict(r.target_far, d.name, far.accepted, far.pairs, d.classes, v))
        return out

    def text(self, verdicts: list[RowVerdict] | None = None) -> str:
        """The held-out and FPIR tables; with ``verdicts`` (--check) the held-out rows
        get a verdict column and, under each row not passed, why and what would decide it."""
        return "\n".join(_held_out_lines(self, verdicts) + _fpir_lines(self))


def serving_report(
    data: EmbeddingSet | Sequence[EmbeddingSet],
    ev: Evaluation,
    served: Served,
    *,
    seed: int = 0,
    bootstrap: int = 200,
    thresholds: dict[float, float] | None = None,
    progress: bool = False,
    held_out_far: bool = True,
) -> ServingReport:
    """Held-out FAR (raw and normalised; skipped with ``held_out_far=False``) and FPIR at
    the evaluation's global thresholds (or at ``thresholds``, e.g. a deployed one's)."""
    if thresholds is None:
        thresholds = {t.target_far: t.threshold for t in ev.targets if t.threshold is not None}
    tail = ev.global_tail if served.method != "none" else None
    held = None
    if held_out_far:
        held = held_out(
            data,
            thresholds,
            tail,
            served.settings,
            seed=seed,
            bootstrap=bootstrap,
            progress=progress,
        )
    fpir = None
    if served.gallery_size:
        fpir = held_out_fpir(
            data,
            thresholds,
            served.gallery_size,
            global_tail=tail,
            settings=served.settings,
            seed=seed,
            bootstrap=bootstrap,
        )
    return ServingReport(served, held, fpir)


def _ratio(far, target: float) -> str:
    if far is None or far.far is None:
        return "n/a (too few classes)"
    ci = "" if far.ci is None else f" [{far.ci[0] / target:.2f}, {far.ci[1] / target:.2f}]"
    return f"{far.far / target:.2f}{ci}"


def _held_out_lines(rep: ServingReport, verdicts: list[RowVerdict] | None = None) -> list[str]:
    if not rep.held_out:
        return []
    lines = [
        "",
        "held-out classes (3 class parts per dataset; each part once the gallery the "
        "normalisation is estimated from, once evaluated): FAR / target [95% class-bootstrap CI]",
    ]
    if verdicts:
        lines.append(
            "verdict on the served column's decision interval (the bootstrap's, widened to "
            "the exact Poisson interval of the accepted count)"
        )
    served = rep.served.method
    by_row = {(v.target_far, v.dataset): v for v in verdicts or []}
    width = max([14] + [len(d.name) + 2 for r in rep.held_out for d in r.datasets])
    for r in rep.held_out:
        lines.append(
            f"target FAR {r.target_far:g} at threshold {r.threshold:.6f} (served: {served})"
        )
        head = f"  {'dataset':<{width}}{'raw':>26}{'tenant-tail':>26}{'shift':>10}{'mapped':>8}"
        lines.append(head + (f"{'decision':>16}  verdict" if verdicts else ""))
        for d in r.datasets:
            shift = "n/a" if d.shift is None else f"{d.shift:+.4f}"
            norm = _ratio(d.normalized, r.target_far) if served != "none" else "-"
            row = (
                f"  {d.name:<{width}}{_ratio(d.raw, r.target_far):>26}"
                f"{norm:>26}{shift:>10}{d.active:>6}/3"
            )
            v = by_row.get((r.target_far, d.name))
            if v is None:
                lines.append(row)
                continue
            lines.append(
                f"{row}{v.verdict.ratio_text(r.target_far):>16}  "
                f"{_VERDICT_WORDS[v.verdict.verdict]}"
            )
            if v.verdict.verdict != PASS:
                lines.append(f"      {v.line()}")
    return lines


_VERDICT_WORDS = {PASS: "pass", FAIL: "FAIL", INSUFFICIENT: "insufficient evidence"}


def _fpir_lines(rep: ServingReport) -> list[str]:
    if not rep.fpir:
        return []
    n = rep.served.gallery_size
    lines = ["", f"1:N search with galleries of N = {n} items (queries of held-out classes):"]
    if rep.served.target_fpir is not None:
        lines.append(f"  calibrated for FPIR {rep.served.target_fpir:g} at N = {n}")
    for a, rows in rep.fpir.items():
        lines.append(
            f"target FAR {a:.3g} per pair; independent pairs would give FPIR "
            f"1-(1-a)^N = {independent_fpir(a, n or 1):.3g}"
        )
        lines.append(f"  {'dataset':<14}{'N':>6}{'raw FPIR':>26}{'normalised FPIR':>26}")
        for d in rows:
            lines.append(
                f"  {d.name:<14}{d.gallery_size:>6}{_fpir(d.raw):>26}{_fpir(d.normalized):>26}"
            )
    return lines


def _fpir(f) -> str:
    if f is None or f.fpir is None:
        return "n/a"
    ci = "" if f.ci is None else f" [{f.ci[0]:.3f}, {f.ci[1]:.3f}]"
    return f"{f.fpir:.3f}{ci}"
