"""The calibration document: thresholds per target FAR, bound to one embedder file.

The server trusts the threshold only for the exact model it was measured on, so the
document carries the SHA-256 of the ``.onnx`` bytes and :meth:`CalibrationDoc.
check_model` refuses any other model. Field meanings follow docs/DESIGN.md; the
layout is versioned by ``schema_version`` and checked on load, field by field.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.files import atomic_write_text, sha256_file
from contracts.schema import NUMBER, Check, ListOf, MapOf, Opt, SchemaError, validate
from scorenorm import ScoreHistogram, TailSettings
from scorenorm.histogram import NBINS

SCHEMA_NAME = "tcm-retrieval.calibration"
SCHEMA_VERSION = 2
# Version 1 had no ``normalization`` section; such documents still serve raw scores.
READABLE_VERSIONS = (1, 2)
MAKE_NORMALIZABLE = "python -m calibrate --normalize tenant-tail --model MODEL.onnx"


class CalibrationError(ValueError):
    """A calibration document is malformed or belongs to another model."""


def _prob(spec: Any = NUMBER) -> Check:
    return Check(spec, lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]")


def _similarity() -> Check:
    return Check(NUMBER, lambda v: -1.0 - 1e-6 <= v <= 1.0 + 1e-6, "must lie in [-1, 1]")


def _count() -> Check:
    return Check(int, lambda v: v >= 0, "must be a count >= 0")


def _interval(inner: Any) -> Check:
    return Check(ListOf(inner), lambda v: len(v) == 2 and v[0] <= v[1], "must be [low, high]")


_THRESHOLD = {
    "similarity": _similarity(),
    "distance": Check(NUMBER, lambda v: -1e-6 <= v <= 2 + 1e-6, "must lie in [0, 2]"),
}

_HELD_OUT_FAR = {
    "far": Opt(_prob()),
    "far_ratio": Opt(NUMBER),
    "ci": Opt(_interval(_prob())),
    "accepted": _count(),
    "pairs": _count(),
}

_DATASET_AT_TARGET = {
    "name": str,
    "measurable": bool,
    "k": _count(),
    "impostor_pairs": _count(),
    "genuine_pairs": _count(),
    "far": Opt(_prob()),
    "frr": Opt(_prob()),
    "far_ratio": Opt(NUMBER),
    "threshold": Opt(_THRESHOLD),
    "threshold_drift": Opt(NUMBER),
    # on held-out classes, raw and tenant-tail normalised (calibrate/heldout/normalized.py)
    "held_out": Opt(
        {
            "raw": _HELD_OUT_FAR,
            "normalized": _HELD_OUT_FAR,
            "shift": Opt(NUMBER),
            "active_galleries": _count(),
        }
    ),
}

_TARGET = {
    "target_far": Check(NUMBER, lambda v: 0.0 < v < 1.0, "must lie in (0, 1)"),
    "measurable": bool,
    "k": _count(),
    "impostor_pairs": _count(),
    "genuine_pairs": _count(),
    "threshold": Opt(_THRESHOLD),
    "accepted_impostors": Opt(_count()),
    "achieved_far": Opt(_prob()),
    "tar": Opt(_prob()),
    "frr": Opt(_prob()),
    "ci": Opt(
        {
            "level": _prob(),
            "resamples": _count(),
            "method": str,
            "far": Opt(_interval(_prob())),
            "threshold_similarity": Opt(_interval(_similarity())),
        }
    ),
    "warnings": ListOf(str),
    "datasets": ListOf(_DATASET_AT_TARGET),
    "classes": Opt(ListOf(dict)),
    # 1:N: false positive identification rate per search at a gallery size (held out)
    "fpir": Opt(
        {
            "gallery_size": Check(int, lambda v: v >= 1, "must be >= 1"),
            "target_fpir": Opt(_prob()),
            "independent_pairs_fpir": _prob(),
            "datasets": ListOf(
                {"name": str, "gallery_size": _count(), "raw": dict, "normalized": Opt(dict)}
            ),
        }
    ),
}

_OPIS = {"opis": Opt(NUMBER), "eps_opis": Opt(NUMBER)}

_SPEC = {
    "schema": Check(str, lambda v: v == SCHEMA_NAME, f"must be '{SCHEMA_NAME}'"),
    "schema_version": Check(
        int,
        lambda v: v in READABLE_VERSIONS,
        f"this build reads schema_version {', '.join(map(str, READABLE_VERSIONS))}",
    ),
    "created_at": str,
    "model": {
        "sha256": Check(
            str,
            lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v),
            "must be 64 lowercase hex digits",
        ),
        "file": Opt(str),
        "embedding_dim": Opt(_count()),
    },
    "settings": {
        "far_range": _interval(_prob()),
        "grid_size": Check(int, lambda v: v >= 2, "must be >= 2"),
        "beta": Check(NUMBER, lambda v: v > 0, "must be > 0"),
        "eps": Check(NUMBER, lambda v: 0 < v <= 0.5, "must lie in (0, 0.5]"),
        "bootstrap": _count(),
    },
    "datasets": ListOf(
        {
            "name": str,
            "images": _count(),
            "classes": _count(),
            "excluded_classes": _count(),
            "genuine_pairs": _count(),
            "impostor_pairs": _count(),
            "source": Opt(str),
        },
        min_len=1,
    ),
    "targets": ListOf(_TARGET, min_len=1),
    "consistency": Opt(
        {
            "similarity_range": Opt(_interval(_similarity())),
            "overall": Opt(_OPIS),
            "datasets": Opt(ListOf({"name": str, "opis_drift": Opt(NUMBER), **_OPIS})),
            "cross_dataset": Opt(_OPIS),
        }
    ),
    "reference": Opt(
        {"top1_similarity": Opt({"edges": ListOf(NUMBER, 2), "counts": MapOf(ListOf(_count()))})}
    ),
    # What score normalisation needs (scorenorm/): the method the calibration was made
    # for, its settings, and the pooled impostor tail F_G every tenant is mapped onto.
    "normalization": Opt(
        {
            "method": str,
            "settings": {
                "min_errors": Check(int, lambda v: v >= 1, "must be >= 1"),
                "top_level": Check(NUMBER, lambda v: 0 < v < 1, "must lie in (0, 1)"),
                "levels_per_decade": Check(int, lambda v: v >= 1, "must be >= 1"),
            },
            "global_tail": {
                "bins": Check(int, lambda v: v == NBINS, f"must be {NBINS}"),
                "first_bin": _count(),
                "counts": ListOf(_count()),
                "pairs": _count(),
            },
        }
    ),
}


@dataclass(frozen=True)
class Normalization:
    """The document's normalisation section, parsed."""

    method: str
    settings: TailSettings
    global_tail: ScoreHistogram


@dataclass(frozen=True)
class Target:
    """The part of one target FAR a server acts on."""

    target_far: float
    threshold: float  # similarity; match when s >= threshold
    achieved_far: float
    k: int

    @property
    def distance(self) -> float:
        return 1.0 - self.threshold


class CalibrationDoc:
    """A validated calibration document. ``raw`` keeps every reported field."""

    def __init__(self, raw: dict[str, Any]) -> None:
        try:
            validate(raw, _SPEC)
        except SchemaError as err:
            raise CalibrationError(f"invalid calibration document: {err}") from err
        fars = [t["target_far"] for t in raw["targets"]]
        if len(set(fars)) != len(fars):
            raise CalibrationError("invalid calibration document: targets repeat a target_far")
        self.raw = raw

    @property
    def model_sha256(self) -> str:
        return self.raw["model"]["sha256"]

    def normalization(self) -> Normalization | None:
        """The global tail and settings, or None for a document made without them."""
        raw = self.raw.get("normalization")
        if not raw:
            return None
        return Normalization(
            raw["method"],
            TailSettings(**raw["settings"]),
            ScoreHistogram.from_json(raw["global_tail"]),
        )

    def require_normalization(self, method: str) -> Normalization:
        """The section a server needs to serve ``method``; refuses with the command to run."""
        found = self.normalization()
        if found is None:
            raise CalibrationError(
                f"--normalize {method} needs the global impostor tail in the calibration "
                f"document, and this one has none (schema_version "
                f"{self.raw['schema_version']}); make one with `{MAKE_NORMALIZABLE}`, or "
                "serve raw scores with --normalize none"
            )
        return found

    @property
    def dataset_names(self) -> list[str]:
        return [d["name"] for d in self.raw["datasets"]]

    def targets(self) -> list[Target]:
        """The measurable targets, in document order."""
        return [
            Target(t["target_far"], t["threshold"]["similarity"], t["achieved_far"], t["k"])
            for t in self.raw["targets"]
            if t["measurable"] and t["threshold"] is not None
        ]

    def target(self, target_far: float) -> Target:
        """The calibrated target equal to ``target_far`` (relative tolerance 1e-9)."""
        for t in self.targets():
            if math.isclose(t.target_far, target_far, rel_tol=1e-9):
                return t
        have = ", ".join(f"{t.target_far:g}" for t in self.targets()) or "none"
        raise CalibrationError(f"target FAR {target_far:g} is not calibrated (available: {have})")

    def check_model(self, model_path: str | os.PathLike[str], sha256: str | None = None) -> None:
        """Refuse a model whose bytes differ from the one this document measured."""
        actual = sha256 or sha256_file(model_path)
        if actual != self.model_sha256:
            raise CalibrationError(
                f"calibration was measured on model sha256 {self.model_sha256}, but "
                f"{os.fspath(model_path)} has sha256 {actual}; recalibrate with "
                f"`python -m calibrate --model {os.fspath(model_path)}`"
            )

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=2, sort_keys=False, allow_nan=False) + "\n"


def load_calibration(path: str | os.PathLike[str]) -> CalibrationDoc:
    """Read and validate; errors name the file and the offending field."""
    file = Path(path)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CalibrationError(f"calibration file not found: {file}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CalibrationError(f"{file}: not valid JSON ({err})") from err
    try:
        return CalibrationDoc(raw)
    except CalibrationError as err:
        raise CalibrationError(f"{file}: {err}") from err


def save_calibration(doc: CalibrationDoc | dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate, then write atomically: a half-written file is never visible."""
    checked = doc if isinstance(doc, CalibrationDoc) else CalibrationDoc(doc)
    return atomic_write_text(path, checked.to_json())
