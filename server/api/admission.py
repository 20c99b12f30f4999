"""Admission control: how much work the server takes on at once, and a fair "come back later".

gRPC's own defaults do not protect a Python server: calls the event loop has not
picked up yet wait in gRPC core, which cancels them past its pending-request limits
(the client sees CANCELLED and learns nothing). So the server admits calls itself,
cheaply, as soon as they arrive (server/api/interceptor.py). Work is counted in images,
the unit the embedder's cost grows with (a Match or a stream message is 1, a
MatchBatch or Enroll one per image, any other call 1): at most ``max_images`` of
them and ``max_bytes`` of request messages are worked on at once; beyond that a call
gets RESOURCE_EXHAUSTED with a retry hint at once. A bound in calls would let 256
MatchBatch calls of 16 images queue 4096 images (measured: 10 s server-side p99 at
4x capacity). The default of 64 images (one full embedder batch) was measured against
128 at 4x capacity (docs/RELIABILITY.md): with more admitted work the process answers
each call within 0.5 s once it has picked it up, but calls then wait seconds before
the event loop picks them up at all. Admission is the outer bound; the
micro-batcher's image queue (``--max-queue``) is the inner one. Everything here runs
on the event loop thread, so no lock is needed.

What admission cannot do: a call is seen only once the event loop picks it up, one
per loop iteration (grpc.aio's design). Offered faster than one process can even
answer (measured in docs/RELIABILITY.md), calls wait in gRPC core, bounded by
``--max-pending-calls``; ``tcm_event_loop_lag_seconds`` shows the saturation.

The retry hint is the recent mean time an admitted call holds its images (an
exponentially weighted average): the time after which room has typically been made.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from server.errors import StatusError

MIN_RETRY_AFTER = 0.01
MAX_RETRY_AFTER = 5.0
REASONS = ("images", "bytes", "tenant_rate", "queue")


class OverloadedError(StatusError):
    """RESOURCE_EXHAUSTED with a retry hint: the server is at capacity right now."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after)


class OverloadMetrics:
    """In-flight images and bytes, event-loop lag, and refusals by reason."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "tcm"
        self.images = Gauge(
            "inflight_images",
            "images of admitted calls (and stream messages) being worked on",
            namespace=ns,
            registry=registry,
        )
        self.bytes = Gauge(
            "inflight_request_bytes",
            "request bytes being worked on",
            namespace=ns,
            registry=registry,
        )
        self.loop_lag = Gauge(
            "event_loop_lag_seconds",
            "how late the server's event loop ran its last timer",
            namespace=ns,
            registry=registry,
        )
        self.rejections = Counter(
            "overload_rejections",
            "calls answered RESOURCE_EXHAUSTED, by reason: images/bytes (admission), "
            "tenant_rate (per-tenant rate limit), queue (embedding queue full)",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        for reason in REASONS:  # export zeros before the first rejection
            self.rejections.labels(reason)


@dataclass(frozen=True)
class AdmissionLimits:
    max_images: int = 64
    max_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.max_images < 1 or self.max_bytes < 1:
            raise ValueError("admission limits must be >= 1")


@dataclass
class Ticket:
    """One admitted call (or stream message); hand it back with :meth:`Admission.release`."""

    images: int
    size: int
    started: float = field(default_factory=time.perf_counter)
    released: bool = False


class Admission:
    """Bounds the images and request bytes being worked on; refuses the rest at once."""

    def __init__(
        self, limits: AdmissionLimits = AdmissionLimits(), metrics: OverloadMetrics | None = None
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.images = 0
        self.bytes = 0
        self.calls = 0  # admitted calls holding a ticket
        self.loop_lag = 0.0  # seconds the event loop ran a timer late, see watch_loop()
        self._hold = 0.05  # EWMA of seconds a call holds its slot; a guess until measured

    def admit(self, images: int, size: int) -> Ticket:
        """A ticket for a call of ``images`` images and ``size`` request bytes, or
        :class:`OverloadedError`.

        A call larger than either limit is admitted when nothing else runs, so no valid
        call is refused forever.
        """
        limits = self.limits
        alone = self.calls == 0
        if self.images + images > limits.max_images and not alone:
            self.rejected("images")
            raise OverloadedError(
                f"server at capacity ({self.images} images in progress, the limit is "
                f"{limits.max_images}); retry after the hinted delay",
                self.retry_after(),
            )
        if self.bytes + size > limits.max_bytes and not alone:
            self.rejected("bytes")
            raise OverloadedError(
                f"server at capacity ({self.bytes} request bytes in progress, the limit is "
                f"{limits.max_bytes}); retry after the hinted delay",
                self.retry_after(),
            )
        self.images += images
        self.bytes += size
        self.calls += 1
        self._publish()
        return Ticket(images, size)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.images -= ticket.images
        self.bytes -= ticket.size
        self.calls -= 1
        held = time.perf_counter() - ticket.started
        self._hold += 0.1 * (held - self._hold)
        self._publish()

    def retry_after(self) -> float:
        """Seconds after which room has typically been made (clamped to [10 ms, 5 s])."""
        return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, self._hold))

    async def watch_loop(self, interval: float = 0.01) -> None:
        """Publish how late the event loop runs a timer (``tcm_event_loop_lag_seconds``),
        the saturation signal of an asyncio server, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag = max(0.0, loop.time() - due)
            if self.metrics is not None:
                self.metrics.loop_lag.set(self.loop_lag)

    def rejected(self, reason: str) -> None:
        """Count a refusal (also those decided elsewhere: tenant rate, full queue)."""
        if self.metrics is not None:
            self.metrics.rejections.labels(reason).inc()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.images.set(self.images)
            self.metrics.bytes.set(self.bytes)
