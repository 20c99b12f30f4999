"""Calibration: one global threshold per target FAR, per-dataset drift and OPIS.

numpy (+ faiss on a GPU) only: this package never imports torch. Rooms
(docs/ARCHITECTURE.md): ``consistency`` (the pure OPIS math, a leaf), ``engine/`` (the
exact streaming pair counts behind :func:`evaluate`), ``heldout/`` (FAR on held-out
classes, raw and normalised, and FPIR), ``reports/`` (what a run prints and writes),
``inputs`` (the model and datasets a run reads), ``cli/`` (``python -m calibrate``) and
``studies/`` (``python -m calibrate.studies.leave_tenant_out``).

The public names below load the engine on first use, so importing a leaf such as
``calibrate.consistency`` (the live monitor does) does not pull the engine in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from calibrate.engine.evaluate import allowed_errors, evaluate
    from calibrate.engine.prepare import CalibrationInputError
    from calibrate.engine.results import (
        DatasetAtTarget,
        DatasetResult,
        Evaluation,
        Opis,
        TargetResult,
    )

_PUBLIC = {
    "CalibrationInputError": "calibrate.engine.prepare",
    "DatasetAtTarget": "calibrate.engine.results",
    "DatasetResult": "calibrate.engine.results",
    "Evaluation": "calibrate.engine.results",
    "Opis": "calibrate.engine.results",
    "TargetResult": "calibrate.engine.results",
    "allowed_errors": "calibrate.engine.evaluate",
    "evaluate": "calibrate.engine.evaluate",
}

__all__ = [
    "CalibrationInputError",
    "DatasetAtTarget",
    "DatasetResult",
    "Evaluation",
    "Opis",
    "TargetResult",
    "allowed_errors",
    "evaluate",
]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'calibrate' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
