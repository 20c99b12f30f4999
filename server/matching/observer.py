"""The seam between the server and live monitoring (server/monitoring/ implements it).

The server calls :meth:`DecisionObserver.record_decision` once per Match decision and
:meth:`DecisionObserver.record_feedback` when a client reports ground truth for one;
:meth:`DecisionObserver.tenant_stats` feeds GetTenant, and
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
        threshold: float,
        impostor_accepted: int,
        impostor_total: int,
    ) -> None:
        """One decision. ``impostor_accepted`` / ``impostor_total`` are label-free: gallery
        items of another identity than the top-1 with similarity >= threshold / all such."""

    def record_feedback(self, tenant: str, decision_id: str, matched: bool, is_same: bool) -> None:
        """Ground truth for an earlier decision of this tenant."""

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
        threshold: float,
        impostor_accepted: int,
        impostor_total: int,
    ) -> None:
        return None

    def record_feedback(self, tenant: str, decision_id: str, matched: bool, is_same: bool) -> None:
        return None

    def tenant_stats(self, tenant: str) -> dict[str, float]:
        return {}

    def model_changed(self, reference_top1: Mapping[str, Any] | None) -> None:
        return None
