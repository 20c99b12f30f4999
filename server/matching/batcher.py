"""Dynamic micro-batching: concurrent requests share one onnxruntime call.

In the style of Triton's dynamic batcher: requests queue their preprocessed images;
one worker takes whatever is waiting, waits at most ``max_delay`` seconds for more
(up to ``max_batch`` images; only while callers overlap, so a lone caller pays no
delay), runs the model once in a worker thread (so the event
loop keeps accepting calls) and hands each request its rows. While a batch runs the
next one forms. The queue is bounded in images: beyond ``max_queue`` a request is
refused at once (:class:`QueueFullError` -> RESOURCE_EXHAUSTED) instead of growing
memory. Requests whose caller gave up (deadline, cancel) are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.monitoring.serving import ServerMetrics

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The embedder's queue is full; the client should back off and retry."""


@dataclass
class _Pending:
    inputs: np.ndarray
    future: asyncio.Future
    after: Callable[[np.ndarray], Any] | None = None
    group: Any = None  # callers with the same group share one ``after`` call
    queued_at: float = field(default_factory=time.perf_counter)
    outcome: Any = None
    error: BaseException | None = None


class MicroBatcher:
    """Batches ``run(inputs (n, C, H, W)) -> (n, D)`` across concurrent callers."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        max_batch: int = 64,
        max_delay: float = 0.002,
        max_queue: int = 2048,
        metrics: ServerMetrics | None = None,
        after_executor: Executor | None = None,
    ) -> None:
        """``after_executor``: run the ``after`` calls there, while the next batch embeds
        (for an ``after`` that waits on the network, e.g. a Milvus search); without it
        they run in the embedding thread right after the model (a CPU-bound faiss search
        saves a thread hop that way)."""
        if max_batch < 1 or max_queue < 1 or max_delay < 0:
            raise ValueError("need max_batch >= 1, max_queue >= 1, max_delay >= 0")
        self.run = run
        self.executor = executor
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.metrics = metrics
        self.after_executor = after_executor
        self._finishing: set[asyncio.Task] = set()
        self._queue: deque[_Pending] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._concurrent = False

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    @property
    def queued(self) -> int:
        return self._queued

    async def embed(
        self,
        inputs: np.ndarray,
        after: Callable[[np.ndarray], Any] | None = None,
        group: Any = None,
    ):
        """Embeddings of ``inputs``, or ``after(embeddings)`` when given.

        ``after`` runs in the worker thread right after the model (e.g. the gallery
        search), saving a thread hop per request; its exception is this caller's alone.
        Callers of one batch that name the same hashable ``group`` are merged: ONE
        ``after`` call gets all their rows and must return a list with one entry per
        row, which is split back (one faiss search per micro-batch and tenant instead
        of one per caller); an exception then reaches every caller of the group.
        Never waits for an unbounded queue: a full queue raises QueueFullError.
        """
        if self._closing:
            raise QueueFullError("server is shutting down")
        n = len(inputs)
        if n == 0:
            return np.empty((0, 0), np.float32)
        if self._queued + n > self.max_queue:
            raise QueueFullError(
                f"embedding queue full ({self._queued} of {self.max_queue} images waiting); "
                "retry with backoff"
            )
        pending = _Pending(inputs, asyncio.get_running_loop().create_future(), after, group)
        self._queue.append(pending)
        self._set_queued(self._queued + n)
        self._wakeup.set()
        return await pending.future

    async def close(self) -> None:
        """Finish everything queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    # ------------------------------------------------------------------ worker
    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if (
                self._concurrent
                and self._queued < self.max_batch
                and self.max_delay > 0
                and not self._closing
            ):
                await asyncio.sleep(self.max_delay)  # let concurrent callers join
            batch = self._take()
            # Wait for company next time only when callers overlap: a lone caller would
            # pay max_delay on every call for nothing.
            self._concurrent = len(batch) > 1 or bool(self._queue)
            if batch:
                await self._run(batch)

    def _take(self) -> list[_Pending]:
        """Whole requests, up to max_batch images (a larger single request goes alone)."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            if batch and rows + len(head.inputs) > self.max_batch:
                break
            self._queue.popleft()
            self._set_queued(self._queued - len(head.inputs))
            if head.future.done():  # the caller gave up (deadline or cancel)
                continue
            batch.append(head)
            rows += len(head.inputs)
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        deferred = self.after_executor is not None
        try:
            embed_seconds, out = await loop.run_in_executor(
                self.executor, self._work, batch, not deferred
            )
        except Exception as err:  # the model failed: every caller of this batch learns why
            log.exception("embedding batch of %d requests failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        self._observe(batch, started, embed_seconds)
        if deferred:  # the next batch embeds while these searches wait on the network
            task = loop.create_task(self._after_elsewhere(batch, out))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
            return
        _settle(batch)

    async def _after_elsewhere(self, batch: list[_Pending], out: np.ndarray) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.after_executor, _finish_groups, batch, out)
        except Exception as err:  # pragma: no cover - _finish_groups keeps errors per caller
            for p in batch:
                p.error = p.error or err
        _settle(batch)

    def _observe(self, batch: list[_Pending], started: float, embed_seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(sum(len(p.inputs) for p in batch))
            queue = self.metrics.stage_seconds.labels("queue").observe
            embed = self.metrics.stage_seconds.labels("embed").observe
            for p in batch:
                for _ in range(len(p.inputs)):
                    queue(started - p.queued_at)
                    embed(embed_seconds)

    def _work(self, batch: list[_Pending], finish: bool) -> tuple[float, np.ndarray]:
        """Worker thread: one model call for the batch, then (``finish``) each ``after``."""
        inputs = np.concatenate([p.inputs for p in batch]) if len(batch) > 1 else batch[0].inputs
        started = time.perf_counter()
        out = self._run_chunks(inputs)
        elapsed = time.perf_counter() - started
        if finish:
            _finish_groups(batch, out)
        return elapsed, out

    def _run_chunks(self, inputs: np.ndarray) -> np.ndarray:
        if len(inputs) <= self.max_batch:
            return self.run(inputs)
        step = self.max_batch
        return np.concatenate([self.run(inputs[s : s + step]) for s in range(0, len(inputs), step)])

    def _set_queued(self, value: int) -> None:
        self._queued = value
        if self.metrics is not None:
            self.metrics.queue_depth.set(value)


def _settle(batch: list[_Pending]) -> None:
    """Hand every caller its outcome or error (on the event loop)."""
    for p in batch:
        if p.future.done():
            continue
        if p.error is not None:
            p.future.set_exception(p.error)
        else:
            p.future.set_result(p.outcome)


def _finish_groups(batch: list[_Pending], out: np.ndarray) -> None:
    """Each caller's ``after``, one merged call per group (see MicroBatcher.embed)."""
    groups: dict[Any, list[tuple[_Pending, slice]]] = {}
    row = 0
    for n, p in enumerate(batch):
        key = ("alone", n) if p.group is None or p.after is None else ("group", p.group)
        groups.setdefault(key, []).append((p, slice(row, row + len(p.inputs))))
        row += len(p.inputs)
    for members in groups.values():
        _finish_group(members, out)


def _finish_group(members: list[tuple[_Pending, slice]], out: np.ndarray) -> None:
    """Run the ``after`` of one caller, or one merged ``after`` for a group of callers."""
    first = members[0][0]
    if len(members) == 1:
        rows = out[members[0][1]]
        try:
            first.outcome = rows if first.after is None else first.after(rows)
        except Exception as err:  # e.g. StaleModelError: this caller retries
            first.error = err
        return
    rows = np.concatenate([out[part] for _, part in members])
    try:
        results = first.after(rows)
    except Exception as err:
        for p, _ in members:
            p.error = err
        return
    start = 0
    for p, _ in members:
        p.outcome = results[start : start + len(p.inputs)]
        start += len(p.inputs)
