"""Write the calibration document, the Markdown report and the plots of an evaluation.

The document is validated and the plots rendered in memory before anything is
written; the document itself goes last, atomically, so a reader never sees a
document whose report is missing or half written.
"""

from __future__ import annotations

from pathlib import Path

from calibrate.engine.results import Evaluation
from calibrate.heldout.serving import ServingReport
from calibrate.reports.plots import render
from calibrate.reports.report import markdown
from contracts import CalibrationDoc, atomic_write_bytes, atomic_write_text, save_calibration
from contracts.files import sha256_file


def write_outputs(
    ev: Evaluation,
    model: Path,
    sources: list[str],
    out: Path,
    plots_dir: Path | None = None,
    serving: ServingReport | None = None,
) -> list[Path]:
    """calibration JSON at ``out``, report.md next to it, PNGs in ``plots_dir`` (or next)."""
    raw = ev.to_document(
        sha256_file(model),
        model.name,
        normalization=serving.normalization_section() if serving else None,
        held_out=serving.held_out_rows() if serving else None,
        fpir=serving.fpir_rows() if serving else None,
    )
    doc = CalibrationDoc(raw)
    for d, src in zip(doc.raw["datasets"], _source_per_dataset(ev, sources), strict=True):
        d["source"] = src
    pngs = render(ev, serving)
    out = Path(out)
    plots = Path(plots_dir) if plots_dir else out.parent
    rel = [_relative(plots / name, out.parent) for name in pngs]
    report = markdown(ev, str(model), sources, rel, serving.text() if serving else "")
    written = []
    for name, data in pngs.items():
        written.append(atomic_write_bytes(plots / name, data))
    written.append(atomic_write_text(out.parent / "report.md", report))
    written.append(save_calibration(doc, out))
    return written


def _source_per_dataset(ev: Evaluation, sources: list[str]) -> list[str]:
    if len(sources) == 1:
        return [sources[0]] * len(ev.datasets)
    return list(sources)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())
