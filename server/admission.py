"""Admission control: how much work the server takes on at once, and a fair "come back later".

gRPC's own defaults do not protect a Python server: calls the event loop has not
picked up yet wait in gRPC core, which cancels them past its pending-request limits
(the client sees CANCELLED and learns nothing). So the server admits calls itself,
cheaply, as soon as they arrive (server/interceptor.py): at most ``max_calls`` calls
(a stream counts once per message being answered) and ``max_bytes`` of request
messages are worked on at once; beyond that a call gets RESOURCE_EXHAUSTED with a
retry hint at once. Admission is the outer bound; the micro-batcher's image queue
(``--max-queue``) is the inner one. Everything here runs on the event loop thread,
so no lock is needed.

The retry hint is the recent mean time a call holds its slot (an exponentially
weighted average): the time after which a slot has typically been freed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from server.errors import StatusError

MIN_RETRY_AFTER = 0.01
MAX_RETRY_AFTER = 5.0
REASONS = ("calls", "bytes", "tenant_rate", "queue")


class OverloadedError(StatusError):
    """RESOURCE_EXHAUSTED with a retry hint: the server is at capacity right now."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after)


class OverloadMetrics:
    """``tcm_inflight_calls``, ``tcm_inflight_request_bytes``, ``tcm_overload_rejections_total``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "tcm"
        self.calls = Gauge(
            "inflight_calls",
            "calls (stream messages) being worked on",
            namespace=ns,
            registry=registry,
        )
        self.bytes = Gauge(
            "inflight_request_bytes",
            "request bytes being worked on",
            namespace=ns,
            registry=registry,
        )
        self.rejections = Counter(
            "overload_rejections",
            "calls answered RESOURCE_EXHAUSTED, by reason: calls/bytes (admission), "
            "tenant_rate (per-tenant rate limit), queue (embedding queue full)",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        for reason in REASONS:  # export zeros before the first rejection
            self.rejections.labels(reason)


@dataclass(frozen=True)
class AdmissionLimits:
    max_calls: int = 256
    max_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.max_calls < 1 or self.max_bytes < 1:
            raise ValueError("admission limits must be >= 1")


@dataclass
class Ticket:
    """One admitted call (or stream message); hand it back with :meth:`Admission.release`."""

    size: int
    started: float = field(default_factory=time.perf_counter)
    released: bool = False


class Admission:
    """Bounds the calls and request bytes being worked on; refuses the rest at once."""

    def __init__(
        self, limits: AdmissionLimits = AdmissionLimits(), metrics: OverloadMetrics | None = None
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.calls = 0
        self.bytes = 0
        self._hold = 0.05  # EWMA of seconds a call holds its slot; a guess until measured

    def admit(self, size: int) -> Ticket:
        """A ticket for a call of ``size`` request bytes, or :class:`OverloadedError`.

        A single call larger than ``max_bytes`` is admitted when nothing else runs, so
        no valid call is refused forever.
        """
        limits = self.limits
        if self.calls >= limits.max_calls:
            self.rejected("calls")
            raise OverloadedError(
                f"server at capacity ({self.calls} calls in progress, the limit is "
                f"{limits.max_calls}); retry after the hinted delay",
                self.retry_after(),
            )
        if self.bytes + size > limits.max_bytes and self.calls > 0:
            self.rejected("bytes")
            raise OverloadedError(
                f"server at capacity ({self.bytes} request bytes in progress, the limit is "
                f"{limits.max_bytes}); retry after the hinted delay",
                self.retry_after(),
            )
        self.calls += 1
        self.bytes += size
        self._publish()
        return Ticket(size)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.calls -= 1
        self.bytes -= ticket.size
        held = time.perf_counter() - ticket.started
        self._hold += 0.1 * (held - self._hold)
        self._publish()

    def retry_after(self) -> float:
        """Seconds after which a slot has typically been freed (clamped to [10 ms, 5 s])."""
        return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, self._hold))

    def rejected(self, reason: str) -> None:
        """Count a refusal (also those decided elsewhere: tenant rate, full queue)."""
        if self.metrics is not None:
            self.metrics.rejections.labels(reason).inc()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.calls.set(self.calls)
            self.metrics.bytes.set(self.bytes)
