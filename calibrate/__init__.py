"""Calibration: one global threshold per target FAR, per-dataset drift and OPIS.

numpy (+ faiss on a GPU) only: this package never imports torch.
"""

from calibrate.evaluate import allowed_errors, evaluate
from calibrate.prepare import CalibrationInputError
from calibrate.results import DatasetAtTarget, DatasetResult, Evaluation, Opis, TargetResult

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
