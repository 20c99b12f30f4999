"""What an evaluation measured, and its calibration document (contracts/calibration.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from contracts.calibration import SCHEMA_NAME, SCHEMA_VERSION
from scorenorm import ScoreHistogram


@dataclass(frozen=True)
class Opis:
    opis: float | None
    eps_opis: float | None

    def to_json(self) -> dict[str, float | None]:
        return {"opis": self.opis, "eps_opis": self.eps_opis}


@dataclass(frozen=True)
class Interval:
    """A class-bootstrap percentile interval for one target."""

    level: float
    resamples: int
    far: tuple[float, float] | None
    threshold: tuple[float, float] | None  # similarity
    method: str = "class bootstrap, percentile"

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "resamples": self.resamples,
            "method": self.method,
            "far": list(self.far) if self.far else None,
            "threshold_similarity": list(self.threshold) if self.threshold else None,
        }


@dataclass(frozen=True)
class DatasetAtTarget:
    """One dataset at one target FAR: the global threshold's effect and its own threshold."""

    name: str
    measurable: bool  # target * impostor_pairs >= 1 for this dataset
    k: int
    impostor_pairs: int
    genuine_pairs: int
    far: float | None  # at the global threshold (None when no global threshold)
    frr: float | None
    far_ratio: float | None  # far / target
    threshold: float | None  # its own t*_k(a), similarity
    threshold_drift: float | None  # t*_k(a) - t*(a)
    accepted_impostors: int | None  # at the global threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measurable": self.measurable,
            "k": self.k,
            "impostor_pairs": self.impostor_pairs,
            "genuine_pairs": self.genuine_pairs,
            "far": self.far,
            "frr": self.frr,
            "far_ratio": self.far_ratio,
            "threshold": _threshold(self.threshold),
            "threshold_drift": self.threshold_drift,
        }


@dataclass(frozen=True)
class TargetResult:
    """One target FAR on the pooled set: the global threshold and what it achieves."""

    target_far: float
    measurable: bool
    k: int
    impostor_pairs: int
    genuine_pairs: int
    threshold: float | None  # similarity; match when s >= threshold
    accepted_impostors: int | None
    achieved_far: float | None
    tar: float | None
    datasets: list[DatasetAtTarget]
    classes: list[dict[str, Any]]
    warnings: list[str]
    ci: Interval | None = None

    @property
    def distance(self) -> float | None:
        return None if self.threshold is None else 1.0 - self.threshold

    @property
    def frr(self) -> float | None:
        return None if self.tar is None else 1.0 - self.tar

    def dataset(self, name: str) -> DatasetAtTarget:
        return next(d for d in self.datasets if d.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "target_far": self.target_far,
            "measurable": self.measurable,
            "k": self.k,
            "impostor_pairs": self.impostor_pairs,
            "genuine_pairs": self.genuine_pairs,
            "threshold": _threshold(self.threshold),
            "accepted_impostors": self.accepted_impostors,
            "achieved_far": self.achieved_far,
            "tar": self.tar,
            "frr": self.frr,
            "ci": self.ci.to_json() if self.ci else None,
            "warnings": list(self.warnings),
            "datasets": [d.to_json() for d in self.datasets],
            "classes": self.classes,
        }


@dataclass(frozen=True)
class DatasetResult:
    """One calibration dataset (a tenant, or one of several given sets)."""

    name: str
    images: int
    classes: int  # with >= 2 images (used for per-class metrics)
    excluded_classes: int  # with 1 image
    genuine_pairs: int
    impostor_pairs: int
    opis: Opis  # over its classes, in its own calibration range
    opis_drift: float | None  # its term in the cross-dataset OPIS
    similarity_range: tuple[float, float] | None  # its own (t_lo, t_hi)
    recall_at_1: float | None
    utility: np.ndarray | None = field(default=None, repr=False)  # on the pooled grid


@dataclass(frozen=True)
class Evaluation:
    """Everything :func:`calibrate.evaluate` measured; ``to_document`` makes the contract."""

    targets: list[TargetResult]
    datasets: list[DatasetResult]
    overall: Opis  # classes of all datasets, pooled range
    cross_dataset: Opis  # datasets in place of classes, pooled range
    recall_at_1: float
    similarity_range: tuple[float, float] | None  # pooled (t_lo, t_hi)
    grid: np.ndarray | None  # the G pooled thresholds
    class_utility: np.ndarray | None  # (classes with >= 2 images, G) on the pooled grid
    class_names: list[str]  # rows of class_utility, "dataset/class"
    settings: dict[str, Any]
    top1_edges: np.ndarray
    top1_counts: dict[str, np.ndarray]
    embedding_dim: int
    far_curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    # The pooled impostor scores above the engine's cutoff, binned, out of all pairs:
    # the global distribution F_G that score normalisation maps each tenant onto.
    global_tail: ScoreHistogram | None = field(default=None, repr=False)

    def target(self, target_far: float) -> TargetResult:
        for t in self.targets:
            if np.isclose(t.target_far, target_far, rtol=1e-9, atol=0):
                return t
        raise KeyError(f"target FAR {target_far:g} was not evaluated")

    def to_document(
        self,
        model_sha256: str,
        model_file: str | None = None,
        normalization: dict[str, Any] | None = None,
        held_out: dict[float, dict[str, dict]] | None = None,
        fpir: dict[float, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The calibration document (validate and write with contracts.save_calibration).

        ``normalization``: {"method", "settings"} to record with the global tail;
        ``held_out``: {target: {dataset: entry}} from calibrate/heldout/normalized.py;
        ``fpir``: {target: entry} from calibrate/heldout/serving.py.
        """
        doc = self._document(model_sha256, model_file)
        if normalization is not None and self.global_tail is not None:
            doc["normalization"] = {**normalization, "global_tail": self.global_tail.to_json()}
        for t in doc["targets"]:
            if held_out:
                rows = _at(held_out, t["target_far"]) or {}
                for d in t["datasets"]:
                    d["held_out"] = rows.get(d["name"])
            if fpir:
                t["fpir"] = _at(fpir, t["target_far"])
        return doc

    def _document(self, model_sha256: str, model_file: str | None) -> dict[str, Any]:
        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "sha256": model_sha256,
                "file": model_file,
                "embedding_dim": self.embedding_dim,
            },
            "settings": dict(self.settings),
            "datasets": [
                {
                    "name": d.name,
                    "images": d.images,
                    "classes": d.classes,
                    "excluded_classes": d.excluded_classes,
                    "genuine_pairs": d.genuine_pairs,
                    "impostor_pairs": d.impostor_pairs,
                }
                for d in self.datasets
            ],
            "targets": [t.to_json() for t in self.targets],
            "consistency": {
                "similarity_range": list(self.similarity_range) if self.similarity_range else None,
                "overall": self.overall.to_json(),
                "datasets": [
                    {"name": d.name, "opis_drift": d.opis_drift, **d.opis.to_json()}
                    for d in self.datasets
                ],
                "cross_dataset": self.cross_dataset.to_json(),
            },
            "reference": {
                "top1_similarity": {
                    "edges": [float(e) for e in self.top1_edges],
                    "counts": {k: [int(c) for c in v] for k, v in self.top1_counts.items()},
                }
            },
        }


def _at(by_target: dict[float, Any], target: float) -> Any:
    return next((v for k, v in by_target.items() if np.isclose(k, target, rtol=1e-9)), None)


def _threshold(similarity: float | None) -> dict[str, float] | None:
    if similarity is None:
        return None
    return {"similarity": similarity, "distance": 1.0 - similarity}
