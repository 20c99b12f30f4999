"""What the server does, independent of gRPC plumbing: decode, embed, search, decide.

:class:`RetrievalService` owns the serving state (model + its micro-batcher), the
tenants, the decision store and the observer. Errors are :class:`ServiceError` with
the gRPC status code the caller should see; server/api/interceptor.py translates. Blocking work
(decoding, onnxruntime, faiss, fsync) runs in thread pools so the event loop keeps
serving.

Reload safety: a request captures the current :class:`_State`; its embedding and
search use that one model. A search that meets a gallery already switched to a new
model (StaleModelError) is redone with the new state, so reloads drop nothing.
Mutations (Enroll, Remove, tenant changes) and reloads exclude each other through
``_mutations``. Tenant changes and the refresh from a shared store exclude each other
through ``_tenant_changes``: a refresh that read the store before this replica created
(or deleted) a tenant must not apply that stale list after it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from contracts import CalibrationError
from contracts.calibration import Target
from scorenorm import TailMap
from server.auth import KeyRing, Principal, hash_key, new_key
from server.errors import StatusError
from server.matching.batcher import MicroBatcher, QueueFullError
from server.matching.decisions import DecisionStore
from server.matching.imaging import ImageError, ImageLimits, header_pixels, to_model_input
from server.matching.model import ServingModel
from server.matching.observer import DecisionObserver
from server.matching.statistics import (
    NO_EVIDENCE,
    LabelFree,
    StatisticsSettings,
    TenantStatistics,
)
from server.matching.threshold import TenantThreshold
from server.monitoring.serving import ServerMetrics, TenantNormalization
from server.storage import open_store
from server.storage.base import (
    Item,
    SearchResult,
    StaleModelError,
    TailOptions,
    Tenant,
    TenantError,
    check_name,
)

log = logging.getLogger(__name__)

# Any text without control characters (C0, DEL, C1), matched against the WHOLE id
# (fullmatch: ``$`` would let a trailing newline through).
ITEM_ID = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,256}")
LABEL = re.compile(r"[^\x00-\x1f\x7f-\x9f]{0,256}")
Code = grpc.StatusCode
_DECODE_THREADS = 2
SEARCH_THREADS = 4  # concurrent searches against a shared store (Milvus)
INLINE_DECODE_PIXELS = 64 * 64  # e.g. up to four 32x32 images: ~1 ms measured, on the loop


class ServiceError(StatusError):
    """A refusal of the service (bad input, unknown tenant, full queue, ...)."""


@dataclass(frozen=True)
class ServiceConfig:
    max_batch: int = 64
    max_delay: float = 0.002
    max_queue: int = 2048
    max_images_per_call: int = 256
    max_top_k: int = 100
    decision_capacity: int = 100_000
    snapshot_every: int = 1000
    index: str = "flat"  # or "hnsw": approximate top-k for large galleries
    search_threads: int = 1  # faiss OpenMP threads per search
    limits: ImageLimits = field(default_factory=ImageLimits)
    normalize: str | None = None  # score normalisation; None = the calibration's own
    tail: TailOptions = field(default_factory=TailOptions)
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)
    gallery: str = "faiss"  # or milvus://HOST:PORT, milvus-lite:PATH.db (server/storage/)
    store_options: dict = field(default_factory=dict)  # e.g. Milvus timeout, consistency
    replica: str = ""  # this process's name among a shared store's (default: host-pid)


@dataclass
class MatchOutcome:
    decision_id: str
    matched: bool
    result: SearchResult
    served: TenantThreshold  # the threshold, map and target the decision used
    gallery_size: int

    @property
    def threshold(self) -> float:
        """On the normalised scale (= raw similarity without normalisation)."""
        return self.served.threshold

    @property
    def target_far(self) -> float:
        return self.served.target_far

    @property
    def raw_threshold(self) -> float:
        """The tenant's raw similarity that clears ``threshold`` after mapping."""
        return self.served.raw

    @property
    def mapping(self) -> TailMap:
        """The tenant's score map the decision used."""
        return self.served.mapping

    @property
    def normalization(self) -> str:
        """Its method name."""
        return self.served.method

    @functools.cached_property
    def scores(self) -> list[float]:
        """The neighbours' similarities on the calibration's (normalised) scale, in
        [-1, 1], best first (one vectorised map for all of them)."""
        sims = np.array([h.similarity for h in self.result.neighbors], np.float64)
        return np.clip(self.mapping(sims), -1.0, 1.0).tolist()


@dataclass
class _State:
    model: ServingModel
    batcher: MicroBatcher
    statistics: TenantStatistics  # of this model's scores: a reload starts them afresh


class RetrievalService:
    def __init__(
        self,
        model: ServingModel,
        data_dir: Path,
        keys: KeyRing,
        observer: DecisionObserver,
        metrics: ServerMetrics,
        config: ServiceConfig = ServiceConfig(),
    ) -> None:
        self.config = config
        self.keys = keys
        self.observer = observer
        self.metrics = metrics
        self.data_dir = data_dir
        self.tenants = open_store(
            config.gallery,
            data_dir,
            model.embedder.dim,
            model.sha256,
            embed=lambda images: model.embed_images(images, config.limits),
            snapshot_every=config.snapshot_every,
            index=config.index,
            tail=config.tail,
            **config.store_options,
        )
        # with a secret, replicas share the store: any of them can verify a decision id
        self.decisions = DecisionStore(config.decision_capacity, self.tenants.decision_secret)
        # the store's per-thread search settings, in every pool thread that searches
        init = functools.partial(self.tenants.prepare_thread, max(1, config.search_threads))
        self._embed_pool = ThreadPoolExecutor(1, "embed", initializer=init)
        self._work_pool = ThreadPoolExecutor(_DECODE_THREADS, "work", initializer=init)
        self._search_pool: ThreadPoolExecutor | None = None  # searches that wait on a network
        self._first_model = model
        self._state: _State | None = None
        self._mutations: asyncio.Lock | None = None
        self._tenant_changes: asyncio.Lock | None = None
        self._background: set[asyncio.Task] = set()
        self._syncing: asyncio.Task | None = None
        # a process of a shared store publishes its traffic under its own name; a lone
        # process keeps one name across restarts and continues its own evidence
        self.replica = config.replica or (
            f"{socket.gethostname()}-{os.getpid()}" if self.tenants.shared else "local"
        )

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Open the galleries (replay, re-embed if the model changed) and the batcher."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._work_pool, self.tenants.load_all)
        for tenant in self.tenants.all():
            for key_hash in tenant.key_hashes:
                self.keys.add(key_hash, Principal(False, tenant.name))
        # metric labels follow the store's tenants, the same on every replica
        self.metrics.labels.sync(t.name for t in self.tenants.all())
        self._mutations = asyncio.Lock()
        self._tenant_changes = asyncio.Lock()
        if self.tenants.remote:  # Milvus: a search waits on the network, not the CPU
            self._search_pool = ThreadPoolExecutor(SEARCH_THREADS, "search")
        self._state = self._new_state(self._first_model)
        await loop.run_in_executor(self._work_pool, self._state.statistics.load)
        self._publish(self._first_model)
        self.metrics.watch_galleries(self.tenants.sizes)
        self.metrics.watch_normalization(self.normalization_stats)
        self._syncing = loop.create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        """Publish and read traffic evidence every ``sync_seconds`` (matching/statistics.py)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.statistics.sync_seconds)
            await self.sync_statistics(loop)

    async def sync_statistics(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """One sync now (also what tests and the demo call instead of waiting)."""
        loop = loop or asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._work_pool, self._current().statistics.sync)
        except Exception:  # a store that is down now is retried at the next sync
            log.exception("syncing the tenant statistics failed")

    async def close(self) -> None:
        """Drain the batcher, publish the last traffic, close the galleries."""
        if self._syncing is not None:
            self._syncing.cancel()
        if self._state is not None:
            await self._state.batcher.close()
            await self.sync_statistics()
        await asyncio.get_running_loop().run_in_executor(self._work_pool, self.tenants.close)
        self._embed_pool.shutdown(wait=True)
        self._work_pool.shutdown(wait=True)
        if self._search_pool is not None:
            self._search_pool.shutdown(wait=True)

    @property
    def model(self) -> ServingModel:
        return self._current().model

    def _current(self) -> _State:
        if self._state is None:
            raise ServiceError(Code.UNAVAILABLE, "server is starting")
        return self._state

    def _new_state(self, model: ServingModel) -> _State:
        c = self.config
        batcher = MicroBatcher(
            model.embedder.run,
            self._embed_pool,
            c.max_batch,
            c.max_delay,
            c.max_queue,
            self.metrics,
            self._search_pool,
        )
        batcher.start()
        norm = model.normalization
        statistics = TenantStatistics(
            self.tenants,
            self.replica,
            self._snapshots,
            norm.global_tail if norm.enabled else None,
            norm.settings if norm.enabled else None,
            c.statistics,
        )
        return _State(model, batcher, statistics)

    def _snapshots(self) -> dict:
        return {t.name: t.gallery.tail_snapshot() for t in self.tenants.all()}

    def _publish(self, model: ServingModel) -> None:
        self.metrics.served(
            model.thresholds(),
            model.default_far,
            {
                "model_file": str(model.model_path),
                "model_sha256": model.sha256,
                "calibration_sha256": model.calibration_sha256,
                "provider": model.provider,
                "index": self.tenants.describe_index(),
            },
        )

    # ---------------------------------------------------------------- helpers
    def tenant(self, name: str):
        try:
            found = self.tenants.get(name)
        except TenantError as err:
            raise ServiceError(Code.NOT_FOUND, str(err)) from err
        if self.metrics.labels.get(name) is None:
            # Created on another replica since this one's last store refresh: take the
            # store's whole tenant list now, so that the tenant gets the label every
            # replica gives it (labels learnt one tenant at a time would move later).
            self.metrics.labels.sync(self.tenants.names())
        return found

    async def tenant_now(self, name: str):
        """:meth:`tenant`; a reader worker that does not know ``name`` yet (created by the
        writer since its last refresh) first looks at the disk, off the event loop."""
        if self.tenants.follower and self.tenants.peek(name) is None:
            await self._follow(name)
        return self.tenant(name)

    async def _decode(self, images: list[bytes], model: ServingModel) -> list[np.ndarray | str]:
        """Model inputs per image, or the refusal message of a bad one."""
        loop = asyncio.get_running_loop()
        meta, limits = model.embedder.meta, self.config.limits

        def chunk(datas: list[bytes]) -> list[np.ndarray | str]:
            out: list[np.ndarray | str] = []
            observe = self.metrics.stage_seconds.labels("decode").observe
            for data in datas:
                started = time.perf_counter()
                try:
                    out.append(to_model_input(data, meta, limits))
                except ImageError as err:
                    out.append(str(err))
                observe(time.perf_counter() - started)
            return out

        # Small images (by their headers) decode in microseconds: do it here rather than
        # pay two thread hops; anything bigger goes to the pool so the loop never stalls.
        if sum(header_pixels(i) for i in images) <= INLINE_DECODE_PIXELS:
            return chunk(images)
        # one thread hop per worker thread, not per image
        parts = [images[i::_DECODE_THREADS] for i in range(min(_DECODE_THREADS, len(images)))]
        done = await asyncio.gather(
            *(loop.run_in_executor(self._work_pool, chunk, part) for part in parts)
        )
        decoded: list[np.ndarray | str] = [None] * len(images)  # type: ignore[list-item]
        for i, part in enumerate(done):
            decoded[i::_DECODE_THREADS] = part
        return decoded

    async def _embed(self, state: _State, inputs: list[np.ndarray], after=None, group=None):
        """Embeddings (or ``after(embeddings)``, run in the embedding thread; callers of
        one micro-batch with the same ``group`` share one ``after`` call)."""
        try:
            return await state.batcher.embed(np.stack(inputs), after, group)
        except QueueFullError as err:
            raise ServiceError(Code.RESOURCE_EXHAUSTED, str(err)) from err

    # ------------------------------------------------------------------ match
    async def match(
        self,
        tenant_name: str,
        images: list[bytes],
        top_k: int,
        target_far: float,
        read_after: int = 0,
    ) -> list[MatchOutcome | ServiceError]:
        """One outcome per image (a ServiceError for an image that was refused).

        ``read_after``: a write token of an earlier Enroll/Remove (any replica) that the
        search must see (server/storage/base.py)."""
        tenant = await self.tenant_now(tenant_name)
        if read_after and self.tenants.follower and tenant.gallery.newer_instance(read_after):
            # the token's writes were made to a tenant created again since this reader
            # looked: look again, or the old instance's items would answer
            tenant = await self._follow(tenant_name) or tenant
        if not images:
            raise ServiceError(Code.INVALID_ARGUMENT, "no image in the request")
        if len(images) > self.config.max_images_per_call:
            raise ServiceError(
                Code.INVALID_ARGUMENT,
                f"{len(images)} images in one call; the limit is "
                f"{self.config.max_images_per_call}, split the request",
            )
        if not (target_far == 0 or 0 < target_far < 1) or math.isnan(target_far):
            raise ServiceError(Code.INVALID_ARGUMENT, f"target_far {target_far} not in (0, 1)")
        k = min(max(top_k, 1), self.config.max_top_k)
        for _attempt in range(3):
            state = self._current()
            try:
                target = state.model.target(target_far)
            except CalibrationError as err:
                raise ServiceError(Code.INVALID_ARGUMENT, str(err)) from err
            decoded = await self._decode(images, state.model)
            good = [d for d in decoded if not isinstance(d, str)]
            search = functools.partial(self._search, tenant, state, target, k, read_after)
            group = (tenant_name, id(tenant.gallery), state.model.sha256, target.threshold)
            group += (target.target_far, k, read_after)
            try:
                results = await self._embed(state, good, search, group) if good else []
            except StaleModelError:
                continue  # a reload switched the gallery meanwhile: redo with the new model
            size = tenant.gallery.size
            found = iter(results)
            return [
                ServiceError(Code.INVALID_ARGUMENT, d)
                if isinstance(d, str)
                else self._decide(tenant, *next(found), size)
                for d in decoded
            ]
        raise ServiceError(Code.UNAVAILABLE, "model reloaded repeatedly during the call; retry")

    def _search(
        self,
        tenant,
        state: _State,
        target: Target,
        k: int,
        read_after: int,
        embeddings: np.ndarray,
    ) -> list[tuple[SearchResult, TenantThreshold, LabelFree]]:
        """In the embedding thread: the tenant's map and threshold (read here, right before
        the search, once per micro-batch group, from the synced statistics), the search,
        and the batch counted as the tenant's traffic (one GEMM against its sample)."""
        started = time.perf_counter()
        model, statistics = state.model, state.statistics
        snapshot = tenant.gallery.tail_snapshot()
        mapping = statistics.mapping(tenant.name, snapshot)
        served = TenantThreshold.of(mapping, target, model.normalization.method)
        found = tenant.gallery.search(embeddings, k, model.sha256, read_after)
        if self._alive(tenant):
            evidence = statistics.observe(tenant.name, snapshot, embeddings, served.raw)
        else:  # deleted while in flight: its evidence must not come back (nor reach a new one)
            evidence = [NO_EVIDENCE] * len(embeddings)
        per_image = (time.perf_counter() - started) / len(embeddings)
        observe = self.metrics.stage_seconds.labels("search").observe
        for _ in range(len(embeddings)):
            observe(per_image)
        return [(r, served, e) for r, e in zip(found, evidence, strict=True)]

    def _decide(
        self,
        tenant: Tenant,
        result: SearchResult,
        served: TenantThreshold,
        label_free: LabelFree,
        size: int,
    ) -> MatchOutcome:
        top = result.top1
        # the tenant's raw threshold: the same comparison the label-free counts made
        matched = top is not None and top.similarity >= served.raw
        decision_id = self.decisions.add(
            tenant.name, tenant.incarnation, matched, served.target_far
        )
        if top is not None:
            self.metrics.decision(matched, top.similarity)
        if top is not None and self._alive(tenant):  # a deleted tenant's label stays gone
            try:
                self.observer.record_decision(
                    tenant.name,
                    decision_id,
                    top.similarity,
                    matched,
                    served.target_far,
                    label_free.exceedances,
                    label_free.pairs,
                )
            except Exception:  # monitoring must never fail a Match
                log.exception("observer.record_decision failed")
        return MatchOutcome(decision_id, matched, result, served, size)

    # ------------------------------------------------------------- mutations
    async def enroll(
        self, tenant_name: str, items: list[tuple[str, str, bytes]], replace: bool
    ) -> tuple[list[ServiceError | None], int]:
        """Per item None (enrolled) or its error; durable before it returns."""
        tenant = self.tenant(tenant_name)
        if not items:
            raise ServiceError(Code.INVALID_ARGUMENT, "no items in the request")
        if len(items) > self.config.max_images_per_call:
            raise ServiceError(
                Code.INVALID_ARGUMENT,
                f"{len(items)} items in one call; the limit is {self.config.max_images_per_call}",
            )
        errors: list[ServiceError | None] = [None] * len(items)
        for n, (item_id, label, _) in enumerate(items):
            if not ITEM_ID.fullmatch(item_id):
                errors[n] = ServiceError(
                    Code.INVALID_ARGUMENT,
                    f"item_id {item_id[:40]!r} must be 1-256 characters without control characters",
                )
            elif not LABEL.fullmatch(label):
                errors[n] = ServiceError(
                    Code.INVALID_ARGUMENT,
                    f"label {label[:40]!r} must be at most 256 characters without control "
                    "characters",
                )
        assert self._mutations is not None
        async with self._mutations:  # a reload cannot switch models under us
            tenant = self.tenant(tenant_name)  # it may have been deleted while we waited
            state = self._current()
            todo = [n for n in range(len(items)) if errors[n] is None]
            decoded = await self._decode([items[n][2] for n in todo], state.model)
            for n, d in zip(todo, decoded, strict=True):
                if isinstance(d, str):
                    errors[n] = ServiceError(Code.INVALID_ARGUMENT, d)
            todo = [n for n, d in zip(todo, decoded, strict=True) if not isinstance(d, str)]
            if todo:
                inputs = [d for d in decoded if not isinstance(d, str)]
                vectors = await self._embed(state, inputs)
                batch = [Item(*items[n]) for n in todo]
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self._work_pool, tenant.gallery.add, batch, vectors, state.model.sha256, replace
                )
                for n, code in zip(todo, outcome, strict=True):
                    if code == "ALREADY_EXISTS":
                        errors[n] = ServiceError(
                            Code.ALREADY_EXISTS,
                            f"item {items[n][0]!r} exists; set replace to overwrite it",
                        )
                    elif code == "OUT_OF_RANGE":
                        errors[n] = ServiceError(
                            Code.INVALID_ARGUMENT,
                            f"item {items[n][0]!r}: this gallery backend keeps source images "
                            "up to 48 KiB (Milvus VARCHAR); send a smaller image",
                        )
                    elif code is not None:
                        errors[n] = ServiceError(
                            Code.INVALID_ARGUMENT, f"item {items[n][0]!r} repeats in the request"
                        )
        return errors, tenant.gallery.size

    async def remove(
        self, tenant_name: str, item_ids: list[str]
    ) -> tuple[list[str], list[str], int]:
        tenant = self.tenant(tenant_name)
        if not item_ids:
            raise ServiceError(Code.INVALID_ARGUMENT, "no item_ids in the request")
        assert self._mutations is not None
        async with self._mutations:
            tenant = self.tenant(tenant_name)
            removed, missing = await asyncio.get_running_loop().run_in_executor(
                self._work_pool, tenant.gallery.remove, item_ids
            )
        return removed, missing, tenant.gallery.size

    def write_token(self, tenant_name: str) -> int:
        """The token a Match must carry to see this tenant's writes so far (0: none needed)."""
        try:
            if not self.tenants.shared:  # one process: every search sees every write
                return 0
            return int(self.tenants.get(tenant_name).gallery.write_token)
        except TenantError:
            return 0

    async def refresh_tenants(self) -> None:
        """Follow tenants and tenant keys that other replicas created or deleted; a tenant
        deleted elsewhere (or deleted and created again) leaves monitoring here too."""
        loop = asyncio.get_running_loop()
        assert self._tenant_changes is not None
        async with self._tenant_changes:
            # a follower store names what it replaced (a miss path may swap one too)
            before = None if self.tenants.follower else self._incarnations()
            stored = await loop.run_in_executor(self._work_pool, self.tenants.refresh)
            for name, key_hashes in stored.items():
                entries = [(h, Principal(False, name)) for h in key_hashes]
                self.keys.set_source(f"tenant:{name}", entries)
            for name in self.keys.tenants() - set(stored):
                self.keys.forget_tenant(name)
            after = self._incarnations()
            if before is None:
                changed = self.tenants.gone()
            else:
                changed = [n for n, i in before.items() if after.get(n) != i]
            for name in changed:
                self._tenant_gone(name)
            self.metrics.labels.sync(after)

    async def follow_tenant(self, name: str) -> bool:
        """A reader worker's miss path: a call named a tenant or a key this process has not
        refreshed yet; look at the tenant as stored now. True when it exists there (its
        keys are then the ones this process checks)."""
        return await self._follow(name) is not None

    async def _follow(self, name: str) -> Tenant | None:
        """The tenant as stored now (a follower store), read in the work pool: it may wait
        for a refresh, or open a gallery. An instance it replaces leaves monitoring and
        the statistics, as at a refresh (each replacement told once: one the refresh
        made meanwhile is not forgotten twice, after the new instance began serving)."""
        loop = asyncio.get_running_loop()
        tenant = await loop.run_in_executor(self._work_pool, self.tenants.follow, name)
        for gone in self.tenants.gone():
            self._tenant_gone(gone)
        if tenant is not None:
            entries = [(h, Principal(False, name)) for h in tenant.key_hashes]
            self.keys.set_source(f"tenant:{name}", entries)
        return tenant

    def _alive(self, tenant: Tenant) -> bool:
        """Whether ``tenant`` is still the store's tenant of its name: a Match that finishes
        after a DeleteTenant must not bring back the deleted tenant's windows, label or
        traffic evidence, nor hand them to a tenant created again under the name."""
        try:
            return self.tenants.get(tenant.name).incarnation == tenant.incarnation
        except TenantError:
            return False

    def _incarnations(self) -> dict[str, str]:
        return {t.name: t.incarnation for t in self.tenants.all()}

    def _tenant_gone(self, name: str) -> None:
        """Monitoring and the statistics forget a deleted tenant: its windows, counters,
        label and traffic evidence (a tenant created again under the name starts afresh)."""
        self._current().statistics.forget(name)
        try:
            self.observer.tenant_deleted(name)
        except Exception:  # monitoring must never fail an Admin call
            log.exception("observer.tenant_deleted failed")
        self.metrics.labels.remove(name)

    async def feedback(self, tenant_name: str, decision_id: str, is_same: bool) -> bool:
        tenant = await self.tenant_now(tenant_name)
        decision = self.decisions.get(decision_id, tenant.name, tenant.incarnation)
        if decision is None:
            raise ServiceError(
                Code.NOT_FOUND,
                f"no recent decision {decision_id[:40]!r} for tenant {tenant_name!r} "
                f"(the server remembers the last {self.decisions.capacity})",
            )
        try:
            self.observer.record_feedback(
                tenant_name, decision_id, decision.matched, is_same, decision.target_far
            )
        except ValueError as err:
            raise ServiceError(Code.FAILED_PRECONDITION, str(err)) from err
        return decision.matched

    def tenant_info(self, tenant_name: str) -> dict:
        tenant = self.tenant(tenant_name)
        model = self.model
        stats = {}
        try:
            for key, value in self.observer.tenant_stats(tenant_name).items():
                stats[key] = float(value)
        except Exception:
            log.exception("observer.tenant_stats failed")
        norm, statistics = model.normalization, self._current().statistics
        snapshot = tenant.gallery.tail_snapshot()
        mapping = statistics.mapping(tenant_name, snapshot)
        served = TenantThreshold.of(mapping, model.target(0), norm.method)
        evidence = statistics.info(tenant_name, snapshot)
        return {
            "tenant": tenant_name,
            "gallery_size": tenant.gallery.size,
            "target_far": served.target_far,
            "threshold": served.threshold,
            "stats": stats,
            "normalization": served.method,
            "normalization_active": served.mapping.active,
            "tail_pairs": int(evidence["evidence_pairs"]),
            "raw_threshold": served.raw,
            "normalization_min_pairs": norm.settings.min_pairs() if norm.settings else 0,
            "duplicate_pairs": int(evidence["duplicate_pairs"]),
            "traffic_queries": int(evidence["traffic_queries"]),
            "traffic_genuine_share": evidence["traffic_genuine_share"],
            "prior_tenants": int(evidence["prior_tenants"]),
        }

    def normalization_stats(self) -> dict[str, TenantNormalization]:
        """Per tenant: is its map active, its threshold shift (metrics)."""
        model = self.model
        statistics, threshold = self._current().statistics, model.target(0).threshold
        out = {}
        for tenant in self.tenants.all():
            mapping = statistics.mapping(tenant.name, tenant.gallery.tail_snapshot())
            out[tenant.name] = TenantNormalization(mapping.active, mapping.shift(threshold))
        return out

    # ------------------------------------------------------------------ admin
    async def create_tenant(self, name: str) -> str:
        """Create ``name``; returns its new API key ("" with auth off)."""
        try:
            check_name(name)
        except TenantError as err:
            raise ServiceError(Code.INVALID_ARGUMENT, str(err)) from err
        key = new_key() if self.keys.enabled else ""
        key_hash = hash_key(key) if key else None
        assert self._mutations is not None and self._tenant_changes is not None
        async with self._tenant_changes, self._mutations:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._work_pool, self.tenants.create, name, key_hash
                )
            except TenantError as err:
                raise ServiceError(Code.ALREADY_EXISTS, str(err)) from err
            if key_hash:
                self.keys.add(key_hash, Principal(False, name))
            self.metrics.labels.add(name)
        return key

    async def delete_tenant(self, name: str) -> int:
        self.tenant(name)
        assert self._mutations is not None and self._tenant_changes is not None
        async with self._tenant_changes, self._mutations:
            try:
                removed = await asyncio.get_running_loop().run_in_executor(
                    self._work_pool, self.tenants.delete, name
                )
            except TenantError as err:
                raise ServiceError(Code.NOT_FOUND, str(err)) from err
            self.keys.forget_tenant(name)
            self._tenant_gone(name)
        return removed

    def _restart_monitoring(self, model: ServingModel) -> None:
        """Windows of the old model's scores say nothing about the new one's FAR."""
        try:
            self.observer.model_changed(model.reference_top1)
        except Exception:  # monitoring must never fail a reload
            log.exception("observer.model_changed failed")

    async def reload(self, model_path: str, calibration_path: str, device: str) -> dict:
        """Load model + calibration together; re-embed galleries first if the model changed.

        In-flight and new Match calls keep running on the old model until the switch.
        """
        assert self._mutations is not None
        loop = asyncio.get_running_loop()
        old = self._current()
        path = Path(model_path) if model_path else old.model.model_path
        cal = Path(calibration_path) if calibration_path else old.model.calibration_path
        async with self._mutations:
            try:
                new = await loop.run_in_executor(
                    self._work_pool,
                    ServingModel.load,
                    path,
                    cal,
                    device,
                    old.model.default_far,
                    old.model.threads,
                    self.config.normalize,
                )
            except (ValueError, FileNotFoundError, RuntimeError) as err:
                self.metrics.reloads.labels("error").inc()
                raise ServiceError(Code.FAILED_PRECONDITION, f"reload refused: {err}") from err
            reembedded = 0
            prepared = []
            await loop.run_in_executor(self._work_pool, old.statistics.sync)  # publish its last
            state = self._new_state(new)
            try:
                if new.sha256 == old.model.sha256:  # the same scores: the evidence still holds
                    await loop.run_in_executor(
                        self._work_pool, state.statistics.inherit, old.statistics
                    )
                if new.sha256 != old.model.sha256 and self.tenants.follower:
                    embed = functools.partial(new.embed_images, limits=self.config.limits)
                    switch = await loop.run_in_executor(  # read again, re-embedded here
                        self._work_pool, self.tenants.reopen, new.sha256, new.embedder.dim, embed
                    )
                    await loop.run_in_executor(self._work_pool, state.statistics.load)
                    reembedded = switch()  # no await until the model switches below
                elif new.sha256 != old.model.sha256:
                    for tenant in self.tenants.all():
                        items = tenant.gallery.items()
                        vectors = await loop.run_in_executor(  # not the embed thread: Match goes on
                            self._work_pool,
                            new.embed_images,
                            [i.image for i in items],
                            self.config.limits,
                        )
                        await loop.run_in_executor(  # Milvus: written into the new collection
                            self._work_pool,
                            tenant.gallery.prepare_rebuild,
                            new.sha256,
                            items,
                            vectors,
                        )
                        prepared.append((tenant, [i.item_id for i in items], vectors))
                        reembedded += len(items)
                    for tenant, ids, vectors in prepared:  # no await: switch all at once
                        tenant.gallery.dim = new.embedder.dim
                        tenant.gallery.rebuild(new.sha256, ids, vectors)
                    self._state = state
                    embed = functools.partial(new.embed_images, limits=self.config.limits)
                    await loop.run_in_executor(
                        self._work_pool,
                        self.tenants.switch_model,
                        new.sha256,
                        new.embedder.dim,
                        embed,
                    )
                    # the new model's rows (none yet, unless a replica switched before us)
                    await loop.run_in_executor(self._work_pool, state.statistics.load)
                self._state = state
                for tenant, *_ in prepared:
                    await loop.run_in_executor(self._work_pool, tenant.gallery.snapshot)
            except Exception:
                if self._state is not state:  # never switched to: its batcher and model go
                    await state.batcher.close()
                self.metrics.reloads.labels("error").inc()
                raise
        closing = loop.create_task(old.batcher.close())  # drains what the old model queued
        self._background.add(closing)
        closing.add_done_callback(self._background.discard)
        self._publish(new)
        if (new.sha256, new.calibration_sha256) != (old.model.sha256, old.model.calibration_sha256):
            self._restart_monitoring(new)
        self.metrics.reloads.labels("ok").inc()
        return {
            "model_sha256": new.sha256,
            "calibration_sha256": new.calibration_sha256,
            "reembedded_items": reembedded,
            "provider": new.provider,
        }
