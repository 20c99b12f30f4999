"""What every tenant's decisions rest on, the same on every replica once they have synced.

A tenant's raw threshold for a target FAR comes from its score map (scorenorm.tail_map),
and the map from three kinds of evidence (scorenorm.evidence):

- its **gallery sample** (server/storage/tail_stats.py): kept by the store, so every
  replica reads the same;
- its **unlabelled traffic** (scorenorm.traffic): every served query scored against the
  sample. Each process keeps what it saw since it last published (``pending``), adds it
  to its own cumulative row and publishes that row to the store every
  ``sync_seconds``; then it reads every replica's rows and merges them (``synced``, in a
  fixed order). Decisions use only ``synced``: a replica's own traffic reaches its
  decisions through the store, at the same moment as everyone else's, so it never makes
  its decisions differ from another replica's. The lag: a query counts in decisions
  one to two sync periods after it was served;
- the **deployment prior**: every tenant's own evidence (gallery + synced traffic),
  pooled, recomputed at every sync from the synced state alone.

The live monitor's label-free FAR is this replica's: a window of its recent traffic,
fitted the same way, read at each decision's own threshold (per decision: the expected
impostor pairs at or above it, and the impostor pairs behind them). Those numbers go to
the DecisionObserver, which sums them into counters that add up across replicas.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from scorenorm import ScoreHistogram, TailMap, TailSettings, identity_map
from scorenorm.evidence import (
    EvidenceSettings,
    Survival,
    own_evidence,
    prior_of,
    traffic_survival,
)
from scorenorm.tail_map import tenant_map
from scorenorm.traffic import (
    FISHER,
    SHIFT,
    BinnedQueries,
    Null,
    ScoredQueries,
    TrafficFit,
    TrafficTail,
    residual,
)
from server.storage.base import TrafficRow
from server.storage.tail_stats import TailSnapshot

log = logging.getLogger(__name__)

MIN_MEMBERS = 3  # sampled gallery items a query must be scored against to count
IDENTITY = identity_map()


@dataclass(frozen=True)
class StatisticsSettings:
    """``evidence``: how gallery, traffic and prior are weighed (scorenorm.evidence).
    ``sync_seconds``: how often traffic is published and the replicas' rows read.
    ``window``: queries in the monitor's window of this replica's traffic, kept in
    ``chunks`` parts. ``refit_every``: queries between refits of that window (64: four
    refits per chunk of 250 queries, the granularity at which the window moves anyway;
    a refit costs about 1.2 ms, so at 32 it was a third of the statistics' CPU).
    ``row_queries``: the most queries a replica's cumulative row stands for; beyond it
    the row is scaled down, so old traffic fades instead of outweighing new traffic."""

    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)
    sync_seconds: float = 10.0
    window: int = 1000
    chunks: int = 4
    refit_every: int = 64
    row_queries: float = 100_000.0

    def __post_init__(self) -> None:
        if not self.sync_seconds > 0:
            raise ValueError(f"sync_seconds must be > 0, got {self.sync_seconds}")
        if self.window < self.chunks or self.chunks < 1:
            raise ValueError(f"need window >= chunks >= 1, got {self.window}, {self.chunks}")


@dataclass(frozen=True)
class LabelFree:
    """One decision's label-free evidence: expected impostor pairs at or above its
    threshold, and the impostor pairs behind them (its scored items less the expected
    genuine one)."""

    exceedances: float
    pairs: float


NO_EVIDENCE = LabelFree(0.0, 0.0)


class _Window:
    """The last ``window`` queries of this replica's traffic of one tenant, in chunks."""

    def __init__(self, settings: StatisticsSettings) -> None:
        self._per_chunk = settings.window // settings.chunks
        self._chunks: deque[tuple[TrafficTail, list[int]]] = deque(
            [(TrafficTail(scale=FISHER), [0])], maxlen=settings.chunks
        )
        self.total = TrafficTail(scale=FISHER)
        self.queries = 0  # in the window now (counted, not summed from the histograms)

    def add(self, binned: BinnedQueries, queries: int) -> None:
        if self._chunks[-1][1][0] >= self._per_chunk:
            if len(self._chunks) == self._chunks.maxlen:
                oldest, count = self._chunks[0]
                self.total.absorb(oldest, sign=-1.0)
                self.queries -= count[0]
            self._chunks.append((TrafficTail(scale=FISHER), [0]))
        chunk, count = self._chunks[-1]
        chunk.add_binned(binned)
        count[0] += queries
        self.total.add_binned(binned)
        self.queries += queries


class _TenantTraffic:
    """One tenant's traffic in this process; guarded by ``lock``."""

    def __init__(self, settings: StatisticsSettings) -> None:
        self.lock = threading.Lock()
        self.pending = TrafficTail()
        self.published = TrafficTail()
        self.synced = TrafficTail()
        self.synced_version = 0
        self.rows: dict[str, tuple[int, TrafficTail]] = {}  # replica -> (stamp, newest row)
        self.window = _Window(settings)
        self.fit: TrafficFit | None = None
        self.fit_queries = 0.0


@dataclass
class _Cached:
    key: tuple
    own: Survival
    traffic: TrafficFit | None


class TenantStatistics:
    """Every tenant's traffic, maps and the deployment prior, for one served model.

    ``global_tail`` and ``tail``: the calibration's impostor tail and map settings
    (None: normalisation off; traffic still feeds the monitor). ``store``: where rows
    are published and read (server/storage/base.py GalleryStore). ``snapshots``: the
    current tail snapshot of every tenant (name -> TailSnapshot), for the prior.
    """

    def __init__(
        self,
        store,
        replica: str,
        snapshots: Callable[[], dict[str, TailSnapshot]],
        global_tail: ScoreHistogram | None,
        tail: TailSettings | None,
        settings: StatisticsSettings = StatisticsSettings(),
    ) -> None:
        self.store = store
        self.replica = replica
        self.settings = settings
        self._snapshots = snapshots
        self.global_tail = global_tail
        self.tail = tail
        self._reference = Survival.of_histogram(global_tail) if global_tail else None
        self._tenants: dict[str, _TenantTraffic] = {}
        self._own: dict[str, _Cached] = {}
        self._maps: dict[str, tuple[tuple, TailMap]] = {}
        self._prior: Survival | None = None
        self._prior_tenants = 0
        self._prior_version = 0
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._seen = 0  # newest row stamp read so far (ns)

    @property
    def normalized(self) -> bool:
        return self.global_tail is not None and self.tail is not None

    def _traffic(self, tenant: str) -> _TenantTraffic:
        with self._lock:
            found = self._tenants.get(tenant)
            if found is None:
                found = self._tenants[tenant] = _TenantTraffic(self.settings)
            return found

    # ------------------------------------------------------------------ serving path
    def observe(
        self, tenant: str, snapshot: TailSnapshot, queries: np.ndarray, raw_threshold: float
    ) -> list[LabelFree]:
        """Counts a micro-batch of served queries as traffic of ``tenant`` (one GEMM
        against the sample) and returns each one's label-free evidence at its threshold."""
        members = len(snapshot.codes)
        if members < MIN_MEMBERS or not len(queries):
            return [NO_EVIDENCE] * len(queries)
        scores = np.asarray(queries, np.float32) @ snapshot.vectors.T
        scored = ScoredQueries.of(scores, snapshot.codes)  # reduced once, binned twice:
        evidence = scored.binned(SHIFT)  # the maps' evidence
        seen = scored.binned(FISHER)  # the monitor's window: the same scores, in z
        locations, group = scored.location, scored.group
        traffic = self._traffic(tenant)
        with traffic.lock:
            traffic.pending.add_binned(evidence)
            traffic.window.add(seen, len(queries))
            fit = self._window_fit(traffic, snapshot.null)
        if fit is None:
            return [NO_EVIDENCE] * len(queries)
        pairs = members - fit.genuine_share * group  # its rank-1 identity may be genuine
        exceed = fit.residual_at(residual(raw_threshold, locations, fit.scale))
        return [LabelFree(float(p * e), float(p)) for p, e in zip(pairs, exceed, strict=True)]

    def _window_fit(self, traffic: _TenantTraffic, null: Null) -> TrafficFit | None:
        queries = traffic.window.queries
        due = traffic.fit is None or queries - traffic.fit_queries >= self.settings.refit_every
        if due or queries < traffic.fit_queries:  # a chunk left the window
            traffic.fit = traffic.window.total.fit(null)
            traffic.fit_queries = queries
        return traffic.fit

    def mapping(self, tenant: str, snapshot: TailSnapshot) -> TailMap:
        """The tenant's score map from the synced state (cached until it changes)."""
        if not self.normalized:
            return IDENTITY
        traffic = self._traffic(tenant)
        key = (snapshot.version, traffic.synced_version, self._prior_version)
        with self._lock:
            found = self._maps.get(tenant)
            if found is not None and found[0] == key:
                return found[1]
        own = self._own_evidence(tenant, snapshot, traffic)
        with self._lock:
            prior = self._prior
        assert self.global_tail is not None and self.tail is not None
        mapping = tenant_map(
            own, prior, self.global_tail, self.tail, self.settings.evidence, self._reference
        )
        with self._lock:
            self._maps[tenant] = (key, mapping)
        return mapping

    def _own_evidence(self, tenant: str, snapshot: TailSnapshot, traffic: _TenantTraffic):
        key = (snapshot.version, traffic.synced_version)
        with self._lock:
            cached = self._own.get(tenant)
        if cached is not None and cached.key == key:
            return cached.own
        with traffic.lock:
            synced = traffic.synced
        fit = synced.fit(snapshot.null) if synced.queries > 0 else None
        survival = traffic_survival(fit, self.settings.evidence)
        own = own_evidence(snapshot.gallery, survival, self.settings.evidence)
        with self._lock:
            self._own[tenant] = _Cached(key, own, fit)
        return own

    # ------------------------------------------------------------------ sync
    def load(self) -> None:
        """At start: read every row, and continue this replica's own where a previous run
        of it left off (a restart must not overwrite its evidence with an empty row)."""
        with self._sync_lock:
            self._read(set(self.store.names()))
            with self._lock:
                tenants = list(self._tenants.values())
            for traffic in tenants:
                with traffic.lock:
                    own = traffic.rows.get(self.replica)
                    if own is not None and traffic.published.queries == 0:
                        traffic.published = own[1]
            self._recompute_prior()

    def inherit(self, other: TenantStatistics) -> None:
        """Take over ``other``'s traffic (a reload that kept the model: the same scores,
        so the same evidence; only the maps are rebuilt, for the new calibration)."""
        with self._sync_lock, other._sync_lock:
            with other._lock:
                self._tenants = dict(other._tenants)
            self._seen = other._seen
            self._recompute_prior()

    def sync(self) -> None:
        """Publish this replica's new traffic, read every replica's, merge, and recompute
        the prior. Runs in a background thread every ``sync_seconds``."""
        with self._sync_lock:
            known = set(self.store.names())  # one read of the tenant list per sync
            self._publish(known)
            self._read(known)
            self._recompute_prior()

    def _publish(self, known: set[str]) -> None:
        with self._lock:
            tenants = list(self._tenants.items())
        for name, traffic in tenants:
            if name not in known:  # deleted (a Match in flight may have counted it again)
                self.forget(name)
                continue
            with traffic.lock:
                new, traffic.pending = traffic.pending, TrafficTail()
                row = traffic.published.merged(new)
            if new.queries <= 0:
                continue
            if row.queries > self.settings.row_queries:
                row = row.scaled(self.settings.row_queries / row.queries)
            try:
                self.store.publish_traffic(name, self.replica, row.to_bytes())
            except Exception as err:  # the store is down: publish it at the next sync
                log.warning("publishing traffic of %s failed: %s", name, err)
                with traffic.lock:
                    traffic.pending = new.merged(traffic.pending)
                continue
            with traffic.lock:
                traffic.published = row

    def _read(self, known: set[str]) -> None:
        rows: list[TrafficRow] = self.store.read_traffic(max(0, self._seen - 60_000_000_000))
        changed: set[str] = set()
        for row in sorted(rows, key=lambda r: (r.tenant, r.replica, r.stamp)):
            if row.tenant not in known:
                continue
            traffic = self._traffic(row.tenant)
            self._seen = max(self._seen, row.stamp)
            with traffic.lock:
                known_stamp = traffic.rows.get(row.replica, (-1, None))[0]
            if row.stamp <= known_stamp:
                continue  # read before (rows are re-read for a minute: clocks differ)
            try:
                tail = TrafficTail.from_bytes(row.blob)
            except Exception as err:  # one bad row must not stop every tenant's sync
                log.warning("unreadable traffic row %s/%s: %s", row.tenant, row.replica, err)
                continue
            with traffic.lock:
                traffic.rows[row.replica] = (row.stamp, tail)
            changed.add(row.tenant)
        for name in changed:
            traffic = self._traffic(name)
            with traffic.lock:
                merged = TrafficTail()
                for replica in sorted(traffic.rows):  # a fixed order: identical sums
                    merged = merged.merged(traffic.rows[replica][1])
                traffic.synced = merged
                traffic.synced_version += 1

    def _recompute_prior(self) -> None:
        if not self.normalized:
            return
        snapshots = self._snapshots()
        owns = [
            self._own_evidence(name, snapshots[name], self._traffic(name))
            for name in sorted(snapshots)
        ]
        assert self._reference is not None
        prior = prior_of(owns, self._reference, self.settings.evidence)
        with self._lock:
            same = (prior is None and self._prior is None) or (
                prior is not None
                and self._prior is not None
                and np.array_equal(prior.values, self._prior.values)
            )
            if not same:
                self._prior = prior
                self._prior_version += 1
            self._prior_tenants = sum(o.pairs > 0 for o in owns)

    def forget(self, tenant: str) -> None:
        """A deleted tenant: its traffic, maps and evidence go (its store rows went with it)."""
        with self._lock:
            self._tenants.pop(tenant, None)
            self._own.pop(tenant, None)
            self._maps.pop(tenant, None)

    # ------------------------------------------------------------------ reporting
    def info(self, tenant: str, snapshot: TailSnapshot) -> dict[str, float]:
        """What GetTenant reports of the evidence behind the tenant's map."""
        traffic = self._traffic(tenant)
        own = self._own_evidence(tenant, snapshot, traffic) if self.normalized else None
        with self._lock:
            cached = self._own.get(tenant)
            prior_tenants = self._prior_tenants if self._prior is not None else 0
        fit = cached.traffic if cached else None
        with traffic.lock:
            queries = traffic.synced.queries
        return {
            "duplicate_pairs": float(snapshot.duplicates),
            "traffic_queries": float(queries),
            "traffic_genuine_share": fit.genuine_share if fit else float("nan"),
            "evidence_pairs": own.pairs if own else float(snapshot.gallery.total),
            "prior_tenants": float(prior_tenants),
        }
