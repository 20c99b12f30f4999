"""The seam between the server and live monitoring (server/monitoring/ implements it).

The server calls :meth:`DecisionObserver.record_decision` once per Match decision (at
whichever calibrated target FAR the call asked for), :meth:`DecisionObserver.record_feedback`
when a client reports ground truth for one, and :meth:`DecisionObserver.tenant_deleted`
when DeleteTenant removed a tenant (a tenant created again under that name must not
inherit its statistics); :meth:`DecisionObserver.tenant_stats` feeds GetTenant, and
:meth:`DecisionObserver.model_changed` follows a Reload. Keeping this a Protocol lets
the server run (and be tested) without the monitoring code, via :class:`NullObserver`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DecisionObserver(Protocol):
    def record_decision(
        self,
        tenant: str,
        decision_id: str,
        top1_similarity: float,
        matched: bool,
        target_far: float,
        label_free_exceedances: float,
        label_free_pairs: float,
    ) -> None:
        """One decision made at the calibrated ``target_far``. The label-free numbers:
        the expected impostor pairs at or above the decision's threshold, and the
        impostor pairs behind that expectation (fractional in general)."""

    def record_feedback(
        self, tenant: str, decision_id: str, matched: bool, is_same: bool, target_far: float
    ) -> None:
        """Ground truth for an earlier decision of this tenant, made at ``target_far``."""

    def tenant_deleted(self, tenant: str) -> None:
        """The tenant was deleted: forget its windows, counters and label."""

    def tenant_stats(self, tenant: str) -> dict[str, float]:
        """Live statistics of a tenant (names documented by the implementation)."""

    def model_changed(self, reference_top1: Mapping[str, Any] | None) -> None:
        """A reload switched model or calibration: start the windows afresh, with the new
        calibration's top-1 similarity histogram as the drift reference."""


class NullObserver:
    """Observes nothing: the server without live monitoring."""

    def record_decision(
        self,
        tenant: str,
        decision_id: str,
        top1_similarity: float,
        matched: bool,
        target_far: float,
        label_free_exceedances: float,
        label_free_pairs: float,
    ) -> None:
        return None

    def record_feedback(
        self, tenant: str, decision_id: str, matched: bool, is_same: bool, target_far: float
    ) -> None:
        return None

    def tenant_deleted(self, tenant: str) -> None:
        return None

    def tenant_stats(self, tenant: str) -> dict[str, float]:
        return {}

    def model_changed(self, reference_top1: Mapping[str, Any] | None) -> None:
        return None
