"""Galleries in Milvus (``--gallery milvus://HOST:PORT``, ``milvus-lite:PATH.db`` for tests).

Layout:

- one collection per embedding dimension and model hash, ``tcm_g<dim>_<sha[:16]>``:
  string primary key ``tenant/item``, ``tenant`` as the partition key (many tenants
  share a collection, each search touches its own partition), the item id, label, the
  63-bit hash of the item id (so the tail sample's bottom-k can be queried) and the
  source image (base64, for re-embedding), the vector with a COSINE HNSW index;
- ``tcm_tenants``: tenant names, their hashed API keys and incarnations, plus the HMAC
  secret that makes decision ids verifiable on every replica, and the model all
  replicas write to (the alias ``tcm_current`` names its collection).

Milvus returns scores; the threshold, normalisation and label-free counts stay in
server/matching/service.py. The tail sample is rebuilt by every replica from the store (the
items with the ``capacity`` smallest id hashes: a pure function of the item set) when
a tenant is opened, after a Remove, and every ``tail_refresh`` seconds; the replica's
own enrolments update it at once.

Consistency. Enroll answers with a write token (the insert's Milvus timestamp; after a
Remove, the wall-clock timestamp of its acknowledgement, as 2.3.5 returns no delete
timestamp). A Match that carries a token (``x-tcm-read-after``; RetrievalClient sends
the last one it got) searches with that guarantee timestamp, so it sees that write on
any replica. Without one, a replica reads its own writes (Session) and other replicas'
writes eventually; ``consistency="strong"`` makes every Match Strong (measured on
2.3.5 right after a write: Match p50 0.2 s, p99 0.4 s, the same as with a token or
Session; docs/SCALE.md). Enroll is idempotent: an item is written as
delete-then-insert on servers before 2.4 (2.3.5 loses upserted rows from
partition-key-filtered searches), upsert elsewhere; readers de-duplicate by item id.

Failures: every call has a timeout; Milvus down or failing is
:class:`StoreUnavailableError` (UNAVAILABLE), slow is DEADLINE_EXCEEDED. A write is
acknowledged only after Milvus acknowledged it.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable

import numpy as np

from server.storage import bad_spec, register
from server.storage.base import (
    Hit,
    Item,
    SearchResult,
    StaleModelError,
    StoreUnavailableError,
    TailOptions,
    Tenant,
    TenantError,
    TrafficRow,
    check_name,
    identity,
    new_incarnation,
)
from server.storage.tail_stats import Entry, TailSnapshot, TenantTail, item_hash

log = logging.getLogger(__name__)

REGISTRY = "tcm_tenants"
ALIAS = "tcm_current"
SECRET_ROW = "__secret__"
TRAFFIC_B64 = 65_535  # characters of one published traffic row (Milvus' VARCHAR limit)
MAX_IMAGE_B64 = 65_535  # Milvus VARCHAR limit: images up to ~48 KiB
MAX_QUERY = 16_384  # rows per query (Milvus' limit on offset + limit)
DELETE_ROUNDS = 3  # deletes of one Remove before it reports the store as failing
_HASH_SPACE = 1 << 63


def collection_name(dim: int, model_sha256: str) -> str:
    return f"tcm_g{dim}_{model_sha256[:16]}"


def quote(text: str) -> str:
    """A Milvus expression string literal (double quotes, backslash escapes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def now_token() -> int:
    """A Milvus hybrid timestamp of the current wall clock (physical ms << 18)."""
    return int(time.time() * 1000) << 18


class _Client:
    """pymilvus calls with a timeout, failures turned into StoreUnavailableError."""

    def __init__(self, uri: str, timeout: float) -> None:
        from pymilvus import MilvusClient

        self.uri = uri
        self.timeout = timeout
        try:
            self.raw = MilvusClient(uri, timeout=timeout)
        except Exception as err:
            raise StoreUnavailableError(f"cannot reach Milvus at {uri}: {err}") from err

    def __call__(self, method: str, *args, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        try:
            return getattr(self.raw, method)(*args, **kwargs)
        except _FAILURES as err:  # not programming errors: those must stay visible
            text = f"{type(err).__name__}: {err}"
            slow = "DEADLINE" in text.upper() or "TIMEOUT" in text.upper()
            raise StoreUnavailableError(
                f"Milvus {method} failed ({text[:300]}); nothing was decided or written, retry",
                timeout=slow,
            ) from err

    def last_write_ts(self, collection: str) -> int:
        """The timestamp pymilvus recorded for our last write to ``collection`` (what its
        Session consistency uses); 0 when unknown."""
        try:
            from pymilvus.client.ts_utils import get_collection_ts

            conn = self.raw._get_connection()
            return int(get_collection_ts(collection, conn.server_address, "") or 0)
        except Exception:  # an older/newer pymilvus without this cache: fall back
            return 0


def _failures() -> tuple[type[BaseException], ...]:
    import grpc
    from pymilvus.exceptions import MilvusException

    return (MilvusException, grpc.RpcError, OSError, TimeoutError)


try:
    _FAILURES = _failures()
except ImportError:  # pymilvus not installed: MilvusStore cannot be built anyway
    _FAILURES = (OSError, TimeoutError)


def _uri(spec: str) -> str:
    if spec.startswith("milvus://"):
        return "http://" + spec[len("milvus://") :]
    path = spec[len("milvus-lite:") :]
    if not path.endswith(".db"):
        raise ValueError(f"--gallery {spec!r}: a milvus-lite path must end in .db")
    return path


class MilvusStore:
    """Tenants and galleries in Milvus; safe to share between server processes."""

    kind = "milvus"
    shared = True
    remote = True
    follower = False

    def __init__(
        self,
        spec: str,
        dim: int,
        model_sha256: str,
        embed: Callable[[list[bytes]], np.ndarray] | None = None,
        tail: TailOptions | None = None,
        timeout: float = 5.0,
        consistency: str = "session",
        tail_refresh: float = 10.0,
        hnsw_m: int = 16,
        hnsw_ef: int = 64,
    ) -> None:
        if consistency not in ("session", "strong"):
            raise ValueError(f"consistency must be session or strong, got {consistency!r}")
        self.spec = spec
        self.dim = dim
        self.model_sha256 = model_sha256
        self.embed = embed
        self.tail_options = tail or TailOptions()
        self.consistency = consistency
        self.tail_refresh = tail_refresh
        self.hnsw_m, self.hnsw_ef = hnsw_m, hnsw_ef
        self.client = _Client(_uri(spec), timeout)
        version = str(self.client("get_server_version"))
        self.server_version = version
        # milvus-lite reports its own version ("milvus_lite-3.2.2"); the standalone of the
        # milvus==2.3.5 package reports "v2.3.5-lite": that is a 2.3.5 server
        self.upsert_safe = version.startswith("milvus_lite") or _version_at_least(version, (2, 4))
        self._lock = threading.Lock()
        self._tenants: dict[str, Tenant] = {}
        self._ensure_registry()
        self.collection = self.ensure_collection(dim, model_sha256)
        self.traffic = self._ensure_traffic(model_sha256)
        self.decision_secret = self._secret()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    # ------------------------------------------------------------ collections
    def _ensure_registry(self) -> None:
        from pymilvus import DataType, MilvusClient

        if not self.client("has_collection", REGISTRY):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("pk", DataType.VARCHAR, max_length=128, is_primary=True)
            schema.add_field("payload", DataType.VARCHAR, max_length=16_384)
            schema.add_field("dummy", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector
            index = self.client.raw.prepare_index_params()
            index.add_index("dummy", index_type="FLAT", metric_type="L2")
            self._create(REGISTRY, schema, index)
        self.client("load_collection", REGISTRY)

    def _ensure_traffic(self, model_sha256: str) -> str:
        """The collection of published traffic evidence of a model: one row per (tenant,
        replica), replaced on every publish (server/matching/statistics.py)."""
        from pymilvus import DataType, MilvusClient

        name = f"tcm_traffic_{model_sha256[:16]}"
        if not self.client("has_collection", name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("pk", DataType.VARCHAR, max_length=256, is_primary=True)
            schema.add_field("tenant", DataType.VARCHAR, max_length=64)
            schema.add_field("replica", DataType.VARCHAR, max_length=128)
            schema.add_field("stamp", DataType.INT64)
            schema.add_field("payload", DataType.VARCHAR, max_length=TRAFFIC_B64)
            schema.add_field("dummy", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector
            index = self.client.raw.prepare_index_params()
            index.add_index("dummy", index_type="FLAT", metric_type="L2")
            self._create(name, schema, index)
        self.client("load_collection", name)
        return name

    def _create(self, name: str, schema, index) -> None:
        try:
            self.client(
                "create_collection",
                name,
                schema=schema,
                index_params=index,
                consistency_level="Session",
            )
        except StoreUnavailableError:
            if not self.client("has_collection", name):  # another replica won the race: fine
                raise

    def ensure_collection(self, dim: int, model_sha256: str) -> str:
        """The gallery collection of a model (created, indexed and loaded if missing)."""
        from pymilvus import DataType, MilvusClient

        name = collection_name(dim, model_sha256)
        if not self.client("has_collection", name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("pk", DataType.VARCHAR, max_length=2_048, is_primary=True)
            schema.add_field("tenant", DataType.VARCHAR, max_length=64, is_partition_key=True)
            schema.add_field("item_id", DataType.VARCHAR, max_length=1_100)
            schema.add_field("label", DataType.VARCHAR, max_length=1_100)
            schema.add_field("id_hash", DataType.INT64)
            schema.add_field("image", DataType.VARCHAR, max_length=MAX_IMAGE_B64)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            index = self.client.raw.prepare_index_params()
            index.add_index(
                "vector",
                index_type="HNSW",
                metric_type="COSINE",
                params={"M": self.hnsw_m, "efConstruction": 128},
            )
            self._create(name, schema, index)
        self.client("load_collection", name)
        return name

    def _secret(self) -> bytes:
        secret = self._stored_secret()
        if secret is None:
            self._put(SECRET_ROW, {"secret": secrets.token_bytes(32).hex()})
            secret = self._stored_secret()  # the first writer's, if two raced
        return secret

    def _stored_secret(self) -> bytes | None:
        rows = self.client(
            "query",
            REGISTRY,
            filter=f"pk == {quote(SECRET_ROW)}",
            output_fields=["payload"],
            consistency_level="Strong",
        )
        return bytes.fromhex(json.loads(rows[0]["payload"])["secret"]) if rows else None

    def _put(self, pk: str, payload: dict) -> None:
        row = {"pk": pk, "payload": json.dumps(payload), "dummy": [0.0, 0.0]}
        self.client("delete", REGISTRY, filter=f"pk == {quote(pk)}")
        self.client("insert", REGISTRY, [row])

    # ---------------------------------------------------------------- tenants
    def _registry(self) -> dict[str, dict]:
        rows = self.client(
            "query",
            REGISTRY,
            filter='pk != ""',
            output_fields=["payload"],
            limit=MAX_QUERY,
            consistency_level="Strong",
        )
        return {r["pk"]: json.loads(r["payload"]) for r in rows if r["pk"] != SECRET_ROW}

    def load_all(self) -> None:
        for name, payload in self._registry().items():
            self._open(name, payload)
        if self.tail_refresh > 0 and self._refresher is None:
            self._refresher = threading.Thread(
                target=self._refresh_loop, daemon=True, name="milvus-refresh"
            )
            self._refresher.start()

    def _open(self, name: str, payload: dict) -> Tenant:
        """The open tenant of a registry row; a new one when the row is another
        incarnation than the one open here (deleted and created again elsewhere)."""
        keys, incarnation = payload.get("keys", []), payload.get("incarnation", "")
        with self._lock:
            found = self._tenants.get(name)
            if found is not None and found.incarnation == incarnation:
                found.key_hashes = keys
                return found
        tenant = Tenant(name, MilvusGallery(self, name), keys, incarnation)
        with self._lock:
            found = self._tenants.get(name)
            if found is not None and found.incarnation == incarnation:
                return found
            self._tenants[name] = tenant
            return tenant

    def create(self, name: str, key_hash: str | None) -> Tenant:
        check_name(name)
        if name in self._registry():
            raise TenantError(f"tenant {name!r} already exists")
        payload = {
            "keys": [key_hash] if key_hash else [],
            "created_at": time.time(),
            "incarnation": new_incarnation(),
        }
        self._put(name, payload)
        return self._open(name, payload)

    def delete(self, name: str) -> int:
        tenant = self.get(name)
        items = tenant.gallery.size
        self.client("delete", self.collection, filter=f"tenant == {quote(name)}")
        self.client("delete", self.traffic, filter=f"tenant == {quote(name)}")
        self.client("delete", REGISTRY, filter=f"pk == {quote(name)}")
        with self._lock:
            if self._tenants.pop(name, None) is None:
                raise TenantError(f"unknown tenant {name!r}")
        return items

    def get(self, name: str) -> Tenant:
        with self._lock:
            tenant = self._tenants.get(name)
        if tenant is not None:
            return tenant
        payload = self._registry().get(name)  # created on another replica?
        if payload is None:
            raise TenantError(f"unknown tenant {name!r}; create it with the Admin service")
        return self._open(name, payload)

    def names(self) -> list[str]:
        return sorted(self._registry())

    def all(self) -> list[Tenant]:
        with self._lock:
            return list(self._tenants.values())

    def sizes(self) -> dict[str, int]:
        return {t.name: t.gallery.size for t in self.all()}

    def refresh(self) -> dict[str, list[str]]:
        """Tenants (and their key hashes) as the store has them now; opens new ones and
        forgets deleted ones (another replica's Admin calls)."""
        registry = self._registry()
        for name, payload in registry.items():
            self._open(name, payload)
        with self._lock:
            for name in [n for n in self._tenants if n not in registry]:
                del self._tenants[name]
        return {n: p.get("keys", []) for n, p in registry.items()}

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.tail_refresh):
            for tenant in self.all():
                try:
                    tenant.gallery.sync()
                except StoreUnavailableError as err:
                    log.warning("tail refresh of %s failed: %s", tenant.name, err)

    # ------------------------------------------------------------------ model
    def current_collection(self) -> str | None:
        try:
            return self.client("describe_alias", ALIAS).get("collection_name")
        except StoreUnavailableError:
            return None

    def switch_model(self, model_sha256: str, dim: int, embed) -> None:
        """After a reload re-embedded every tenant into the new model's collection:
        point the alias there (atomic in Milvus) and write there from now on."""
        name = self.ensure_collection(dim, model_sha256)
        if self.current_collection() is None:
            self.client("create_alias", name, ALIAS)
        else:
            self.client("alter_alias", name, ALIAS)
        self.collection, self.model_sha256, self.dim, self.embed = name, model_sha256, dim, embed
        self.traffic = self._ensure_traffic(model_sha256)

    def follow(self, name: str) -> None:
        return None  # replicas learn of tenants at refresh (--store-refresh-seconds)

    def peek(self, name: str) -> Tenant | None:
        with self._lock:
            return self._tenants.get(name)

    def gone(self) -> list[str]:
        return []  # the service compares incarnations around each refresh

    def reopen(self, model_sha256: str, dim: int, embed):
        raise NotImplementedError("every Milvus replica re-embeds (it is not a follower)")

    def describe_index(self) -> str:
        return f"milvus HNSW COSINE ({self.server_version})"

    # ------------------------------------------------------------------ traffic
    def publish_traffic(self, tenant: str, replica: str, blob: bytes) -> None:
        payload = base64.b64encode(blob).decode("ascii")
        if len(payload) > TRAFFIC_B64:
            raise ValueError(f"traffic evidence of {tenant!r} is {len(payload)} characters")
        pk = f"{tenant}\0{replica}"
        row = {
            "pk": pk,
            "tenant": tenant,
            "replica": replica,
            "stamp": time.time_ns(),
            "payload": payload,
            "dummy": [0.0, 0.0],
        }
        self.client("delete", self.traffic, filter=f"pk == {quote(pk)}")
        self.client("insert", self.traffic, [row])

    def read_traffic(self, since: int) -> list[TrafficRow]:
        rows = self.client(
            "query",
            self.traffic,
            filter=f"stamp >= {int(since)}",
            output_fields=["tenant", "replica", "stamp", "payload"],
            limit=MAX_QUERY,
            consistency_level="Strong",
        )
        return [
            TrafficRow(r["tenant"], r["replica"], int(r["stamp"]), base64.b64decode(r["payload"]))
            for r in rows
        ]

    def prepare_thread(self, threads: int) -> None:
        """Nothing: Milvus searches in its own processes."""

    def close(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        try:
            self.client.raw.close()
        except Exception:  # closing a dead connection must not fail shutdown
            log.debug("closing the Milvus client failed", exc_info=True)


class MilvusGallery:
    """One tenant's partition of the store's collection (the TenantGallery protocol)."""

    def __init__(self, store: MilvusStore, tenant: str) -> None:
        self.store = store
        self.tenant = tenant
        self.collection = store.collection
        self.model_sha256 = store.model_sha256
        self.dim = store.dim
        self.reembedded = 0
        self.write_token = 0
        self._lock = threading.RLock()
        self.tail: TenantTail = store.tail_options.new(self.dim)
        self._members: dict[str, tuple[int, int]] = {}  # pk -> (local fid, hash)
        self._next_fid = 0
        self._codes: dict[str, int] = {}
        self._size = 0
        self.sync()

    @property
    def size(self) -> int:
        return self._size

    @property
    def index_kind(self) -> str:
        return self.store.describe_index()

    def _pk(self, item_id: str) -> str:
        return f"{self.tenant}/{item_id}"

    def _where(self, extra: str = "") -> str:
        base = f"tenant == {quote(self.tenant)}"
        return f"{base} and {extra}" if extra else base

    def _consistency(self, read_after: int = 0) -> dict:
        if self.store.consistency == "strong":
            return {"consistency_level": "Strong"}
        token = max(read_after, self.write_token)
        if token:
            return {"consistency_level": "Customized", "guarantee_timestamp": token}
        return {"consistency_level": "Session"}

    def _check_model(self, model_sha256: str) -> None:
        if model_sha256 != self.model_sha256:
            raise StaleModelError(f"gallery is on model {self.model_sha256}, not {model_sha256}")

    # ------------------------------------------------------------- mutations
    def _existing(self, item_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for s in range(0, len(item_ids), 512):
            pks = ",".join(quote(self._pk(i)) for i in item_ids[s : s + 512])
            rows = self.store.client(
                "query",
                self.collection,
                filter=f"pk in [{pks}]",
                output_fields=["item_id"],
                **self._consistency(),
            )
            found |= {r["item_id"] for r in rows}
        return found

    def add(
        self, items: list[Item], embeddings: np.ndarray, model_sha256: str, replace: bool = False
    ) -> list[str | None]:
        embeddings = np.ascontiguousarray(embeddings, np.float32)
        with self._lock:
            self._check_model(model_sha256)
            existing = self._existing([i.item_id for i in items])
            outcome: list[str | None] = []
            accepted: list[int] = []
            seen: set[str] = set()
            for n, item in enumerate(items):
                if item.item_id in seen:
                    outcome.append("INVALID_ARGUMENT")
                elif item.item_id in existing and not replace:
                    outcome.append("ALREADY_EXISTS")
                elif 4 * ((len(item.image) + 2) // 3) > MAX_IMAGE_B64:
                    outcome.append("OUT_OF_RANGE")
                else:
                    outcome.append(None)
                    accepted.append(n)
                seen.add(item.item_id)
            if not accepted:
                return outcome
            rows = [self._row(items[n], embeddings[n]) for n in accepted]
            overwritten = [items[n].item_id for n in accepted if items[n].item_id in existing]
            if overwritten and not self.store.upsert_safe:
                self._delete(overwritten)  # 2.3.5: upsert loses rows from partition-key search
            if overwritten and self.store.upsert_safe:
                self.store.client("upsert", self.collection, rows)
            else:
                self.store.client("insert", self.collection, rows)
            self.write_token = max(
                self.write_token, self.store.client.last_write_ts(self.collection), 1
            )
            self._size += len(accepted) - len(overwritten)
            self._after_add([items[n] for n in accepted], embeddings[accepted], overwritten)
            return outcome

    def _row(self, item: Item, vector: np.ndarray) -> dict:
        return {
            "pk": self._pk(item.item_id),
            "tenant": self.tenant,
            "item_id": item.item_id,
            "label": item.label,
            "id_hash": item_hash(item.item_id),
            "image": base64.b64encode(item.image).decode(),
            "vector": vector.tolist(),
        }

    def _delete(self, item_ids: list[str]) -> None:
        for s in range(0, len(item_ids), 512):
            pks = ",".join(quote(self._pk(i)) for i in item_ids[s : s + 512])
            self.store.client("delete", self.collection, filter=f"pk in [{pks}]")

    def remove(self, item_ids: list[str]) -> tuple[list[str], list[str]]:
        with self._lock:
            unique = list(dict.fromkeys(item_ids))
            existing = self._existing(unique)
            found = [i for i in unique if i in existing]
            missing = [i for i in item_ids if i not in existing]
            if found:
                self._delete_until_gone(found)
                self._size -= len(found)
                self.sync()  # refill the sample from the store (and see the removal)
            return found, missing

    def _delete_until_gone(self, item_ids: list[str]) -> None:
        """Delete, then look: Milvus 2.3 can leave a row of a primary key that was written
        more than once (delete-then-insert; milvus-io/milvus#15744, #17066), and a Remove
        is acknowledged only when the store shows none. The look waits for the time tick
        the sync after it would wait for anyway."""
        left = item_ids
        for _ in range(DELETE_ROUNDS):
            self._delete(left)
            self.write_token = max(self.write_token, now_token())
            left = sorted(self._existing(left))
            if not left:
                return
            log.warning(
                "%s: %d item(s) still stored after a delete; deleting again", self.tenant, len(left)
            )
        raise StoreUnavailableError(
            f"Milvus kept {len(left)} deleted item(s) of {self.tenant!r} after "
            f"{DELETE_ROUNDS} deletes (e.g. {left[0]!r}); retry the Remove"
        )

    def _after_add(self, items: list[Item], vectors: np.ndarray, overwritten: list[str]):
        """The new items join the sample where their hash belongs (bottom-k)."""
        if overwritten:
            self._drop_members([self._pk(i) for i in overwritten])
        entries = []
        for item, vector in zip(items, vectors, strict=True):
            pk = self._pk(item.item_id)
            h = item_hash(item.item_id)
            entries.append(self._entry(pk, h, vector, item.item_id, item.label))
        self.tail.add(entries)
        alive = {int(f) for f in self.tail.sample()[0]}
        self._members = {pk: v for pk, v in self._members.items() if v[0] in alive}

    def _entry(self, pk: str, h: int, vector, item_id: str, label: str) -> Entry:
        fid = self._next_fid
        self._next_fid += 1
        self._members[pk] = (fid, h)
        code = self._codes.setdefault(identity(item_id, label), len(self._codes))
        return Entry(fid, h, np.asarray(vector, np.float32), code)

    def _drop_members(self, pks: list[str]) -> None:
        fids = [self._members.pop(pk)[0] for pk in pks if pk in self._members]
        self.tail.remove(fids)

    # ------------------------------------------------------------------ sync
    def sync(self) -> None:
        """Size and tail sample as the store has them (other replicas' writes included):
        the members become exactly the items with the smallest id hashes."""
        with self._lock:
            count = self.store.client(
                "query",
                self.collection,
                filter=self._where(),
                output_fields=["count(*)"],
                **self._consistency(),
            )
            self._size = int(count[0]["count(*)"]) if count else 0
            want = self._bottom_k(self.tail.capacity)
            current = set(self._members)
            wanted = {r["pk"]: r for r in want}
            self._drop_members([pk for pk in current if pk not in wanted])
            new = [
                self._entry(pk, int(r["id_hash"]), r["vector"], r["item_id"], r["label"])
                for pk, r in wanted.items()
                if pk not in current
            ]
            self.tail.add(new)

    def _bottom_k(self, k: int) -> list[dict]:
        fields = ["pk", "item_id", "label", "id_hash", "vector"]
        if self._size <= min(k, MAX_QUERY):
            rows = self._query(self._where(), fields)
        else:
            bound = min(_HASH_SPACE, int(_HASH_SPACE * min(1.0, 1.5 * k / self._size)))
            while True:
                where = f"id_hash < {bound}" if bound < _HASH_SPACE else "id_hash >= 0"
                rows = self._query(self._where(where), fields)
                if len(rows) >= k or bound >= _HASH_SPACE:
                    break
                bound = min(_HASH_SPACE, 2 * bound)
        unique = {r["pk"]: r for r in rows}  # duplicates of one pk: keep one
        return sorted(unique.values(), key=lambda r: (int(r["id_hash"]), r["pk"]))[:k]

    def _query(self, where: str, fields: list[str]) -> list[dict]:
        return self.store.client(
            "query",
            self.collection,
            filter=where,
            output_fields=fields,
            limit=MAX_QUERY,
            **self._consistency(),
        )

    # ------------------------------------------------------------------ search
    def search(
        self, queries: np.ndarray, k: int, model_sha256: str, read_after: int = 0
    ) -> list[SearchResult]:
        self._check_model(model_sha256)
        queries = np.ascontiguousarray(queries, np.float32)
        if not len(queries):
            return []
        want = max(1, k) + 2  # room for duplicate rows of one item (concurrent enrolments)
        found = self.store.client(
            "search",
            self.collection,
            data=queries.tolist(),
            limit=want,
            filter=self._where(),
            output_fields=["item_id", "label"],
            search_params={
                "metric_type": "COSINE",
                "params": {"ef": max(self.store.hnsw_ef, want)},
            },
            **self._consistency(read_after),
        )
        results = []
        for hits in found:
            seen: set[str] = set()
            neighbors = []
            for hit in hits:
                entity = hit["entity"]
                if entity["item_id"] in seen:
                    continue
                seen.add(entity["item_id"])
                neighbors.append(Hit(entity["item_id"], entity["label"], float(hit["distance"])))
            results.append(SearchResult(neighbors[: max(1, k)]))
        return results

    def range_search(self, query: np.ndarray, threshold: float, model_sha256: str) -> list[Hit]:
        self._check_model(model_sha256)
        found = self.store.client(
            "search",
            self.collection,
            data=[np.asarray(query, np.float32).reshape(-1).tolist()],
            limit=MAX_QUERY,
            filter=self._where(),
            output_fields=["item_id", "label"],
            search_params={
                "metric_type": "COSINE",
                "params": {"radius": float(threshold) - 1e-6, "range_filter": 1.01},
            },
            **self._consistency(),
        )
        hits = {}
        for hit in found[0]:
            e = hit["entity"]
            if float(hit["distance"]) >= threshold:
                hits.setdefault(e["item_id"], Hit(e["item_id"], e["label"], float(hit["distance"])))
        return sorted(hits.values(), key=lambda h: -h.similarity)

    # ------------------------------------------------------------------- items
    def items(self) -> list[Item]:
        """Every item with its image, read in id-hash ranges (no query exceeds the limit)."""
        rows = self._scan(0, _HASH_SPACE, ["item_id", "label", "image"])
        return [Item(r["item_id"], r["label"], base64.b64decode(r["image"])) for r in rows]

    def _scan(self, lo: int, hi: int, fields: list[str]) -> list[dict]:
        upper = f" and id_hash < {hi}" if hi < _HASH_SPACE else ""  # 2**63 is not an int64
        rows = self._query(self._where(f"id_hash >= {lo}{upper}"), fields)
        if len(rows) < MAX_QUERY or hi - lo <= 1:
            return sorted({r["item_id"]: r for r in rows}.values(), key=lambda r: r["item_id"])
        mid = (lo + hi) // 2
        return self._scan(lo, mid, fields) + self._scan(mid, hi, fields)

    def get(self, item_id: str) -> Item | None:
        rows = self.store.client(
            "query",
            self.collection,
            filter=f"pk == {quote(self._pk(item_id))}",
            output_fields=["item_id", "label", "image"],
            **self._consistency(),
        )
        if not rows:
            return None
        r = rows[0]
        return Item(r["item_id"], r["label"], base64.b64decode(r["image"]))

    # ---------------------------------------------------------------- reload
    def prepare_rebuild(self, model_sha256: str, items: list[Item], embeddings: np.ndarray):
        """Write this tenant's items, re-embedded, into the new model's collection (the
        old one keeps serving until :meth:`rebuild` switches)."""
        dim = embeddings.shape[1]
        target = self.store.ensure_collection(dim, model_sha256)
        self.store.client("delete", target, filter=self._where())  # a retried reload
        for s in range(0, len(items), 256):
            rows = [
                self._row(i, v)
                for i, v in zip(items[s : s + 256], embeddings[s : s + 256], strict=True)
            ]
            self.store.client("insert", target, rows)

    def rebuild(self, model_sha256: str, item_ids: list[str], embeddings: np.ndarray) -> None:
        with self._lock:
            self.collection = collection_name(embeddings.shape[1], model_sha256)
            self.model_sha256, self.dim = model_sha256, embeddings.shape[1]
            self.tail = self.store.tail_options.new(self.dim)
            self._members, self._codes = {}, {}
            self.write_token = max(
                self.write_token, self.store.client.last_write_ts(self.collection)
            )
            self.sync()

    def snapshot(self) -> None:
        """Milvus persists by itself: nothing to checkpoint here."""

    def close(self) -> None:
        pass

    # ---------------------------------------------------------- normalisation
    def tail_snapshot(self) -> TailSnapshot:
        """The tail sample and its statistics as last synced from the store."""
        with self._lock:
            return self.tail.snapshot()


def _version_at_least(version: str, want: tuple[int, int]) -> bool:
    digits = version.lstrip("v").split("-")[0].split(".")
    try:
        return tuple(int(d) for d in digits[:2]) >= want
    except ValueError:
        return False


def open_milvus(
    spec: str,
    data_dir,
    dim: int,
    model_sha256: str,
    embed: Callable[[list[bytes]], np.ndarray] | None = None,
    snapshot_every: int = 1000,
    index: str = "flat",
    tail: TailOptions | None = None,
    **options,
) -> MilvusStore:
    """``--gallery milvus://HOST:PORT`` or ``milvus-lite:PATH.db``; the server keeps no
    gallery state of its own (``data_dir``, ``snapshot_every`` and ``index`` are faiss's)."""
    if not spec.startswith(("milvus://", "milvus-lite:")):
        raise bad_spec(spec)
    return MilvusStore(spec, dim, model_sha256, embed, tail, **options)


register("milvus", open_milvus)
register("milvus-lite", open_milvus)
