"""Per-tenant rate limits: one token bucket per tenant, so one tenant cannot starve the rest.

A tenant spends one token per image it sends (Match, each MatchStream message: 1;
MatchBatch and Enroll: one per image; any other call: 1). Its bucket refills at
``rate`` tokens per second up to ``burst``. A call needs ``min(cost, burst)`` tokens
and then pays its full cost, so a batch larger than the burst runs when the bucket
is full and leaves it in debt: the long-run rate holds and no valid call is refused
forever. A refused call gets RESOURCE_EXHAUSTED with the time until it would fit.

Buckets live only for tenants that called recently: a full bucket carries no state,
so they are dropped first when there are more than ``max_buckets`` (callers can name
any tenant before the service says NOT_FOUND). Runs on the event loop thread only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from server.errors import StatusError


class RateLimitedError(StatusError):
    """RESOURCE_EXHAUSTED: this tenant is over its rate; retry after the hint."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TenantRateLimiter:
    """Token buckets of ``rate`` tokens/s and depth ``burst`` per tenant."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = 10_000,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 tokens per second")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        if self.burst < 1:
            raise ValueError("burst must be >= 1")
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def acquire(self, tenant: str, cost: int) -> None:
        """Take ``cost`` tokens from ``tenant``'s bucket, or raise :class:`RateLimitedError`."""
        bucket = self._refilled(tenant)
        need = min(float(cost), self.burst)
        if bucket.tokens < need:
            wait = (need - bucket.tokens) / self.rate
            raise RateLimitedError(
                f"tenant {tenant!r} is over its rate limit ({self.rate:g} images/s, burst "
                f"{self.burst:g}); retry in {wait:.3f} s",
                wait,
            )
        bucket.tokens -= cost

    def refund(self, tenant: str, cost: int) -> None:
        """Give back the tokens of a call that was refused later (e.g. by admission)."""
        bucket = self._buckets.get(tenant)
        if bucket is not None:
            bucket.tokens = min(self.burst, bucket.tokens + cost)

    def _refilled(self, tenant: str) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                self._evict(now, keep=self.max_buckets - 1)
            bucket = self._buckets[tenant] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            self._buckets.move_to_end(tenant)
        return bucket

    def _evict(self, now: float, keep: int) -> None:
        """Drop full buckets (no state lost), then the least recently used ones."""
        for name, b in list(self._buckets.items()):
            if b.tokens + (now - b.updated) * self.rate >= self.burst:
                del self._buckets[name]
        while len(self._buckets) > keep:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
