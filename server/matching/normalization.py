"""The score normalisation a server applies, from its calibration document.

``--normalize`` names the method (scorenorm registry; default: the one the calibration
was made for, ``none`` for a document without a normalisation section). With
``tenant-tail`` every tenant's raw similarity s is mapped through its own tail map
onto the calibration's scale, and the one calibrated threshold t is applied to the
mapped score: because the map is increasing, that is the same as comparing s with the
tenant's raw threshold map^-1(t), which is how Match decides. Each tenant's map is
built from its evidence in server/matching/statistics.py; a tenant with too little of it
(and no deployment prior to lean on) runs with the identity map.
"""

from __future__ import annotations

from dataclasses import dataclass

import scorenorm
from contracts import CalibrationDoc
from contracts.calibration import CalibrationError
from scorenorm import ScoreHistogram, TailSettings


@dataclass(frozen=True)
class ServedNormalization:
    method: str
    settings: TailSettings | None = None
    global_tail: ScoreHistogram | None = None

    @classmethod
    def resolve(cls, calibration: CalibrationDoc, requested: str | None) -> ServedNormalization:
        """The method asked for (or the document's), with what the document gives it.

        Raises CalibrationError (naming the command that makes a suitable document)
        when a normalised method is asked of a document without the global tail.
        """
        found = calibration.normalization()
        method = requested or (found.method if found else "none")
        try:
            scorenorm.choice(servable_only=True)(method)
        except ValueError as err:
            raise CalibrationError(str(err)) from err
        if method == "none":
            return cls("none")
        norm = calibration.require_normalization(method)
        return cls(method, norm.settings, norm.global_tail)

    @property
    def enabled(self) -> bool:
        return self.method != "none"
