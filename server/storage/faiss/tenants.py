"""The tenants of a data dir: one directory, one gallery and hashed keys per tenant.

Layout: ``<data-dir>/tenants/<name>/tenant.json`` (name, creation time, key hashes,
incarnation, token tag) next to the gallery's ``snapshot.npz`` and ``wal.log``, and
``traffic/<model>-<replica>.bin``: each serving process's published traffic evidence
(server/matching/statistics.py), rewritten atomically, so processes sharing the data dir
read each other's. A tenant exists once its ``tenant.json`` is written (atomically);
deletion renames the directory away first, so a crash never leaves half a tenant visible.

``role`` (set by ``--workers N``, server/workers.py): several processes share one data
dir. The ``writer`` owns it as a lone process does; every ``reader`` follows its
galleries (server/storage/faiss/follower.py) and its tenants and keys (:meth:`refresh`),
and writes nothing but its own traffic evidence. ``decision.secret`` lets every one of
them verify the decision ids the others made.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from contracts.files import atomic_write_bytes, atomic_write_text, fsync_dir
from server.storage.base import NAME, Tenant, TenantError, TrafficRow, check_name, new_incarnation
from server.storage.faiss.follower import FollowingGallery, ReadOnlyGalleryError
from server.storage.faiss.gallery import TOKEN_TAGS, Gallery, TailOptions, describe_index

log = logging.getLogger(__name__)

TENANT_FILE = "tenant.json"
TRAFFIC_DIR = "traffic"
SECRET_FILE = "decision.secret"
TAGS_FILE = "token_tags"  # the last token tag given to a tenant of this data dir
ROLES = ("", "writer", "reader")  # "": the data dir's only process


def read_tenant_keys(directory: Path) -> list[str]:
    """The key hashes in ``directory``/tenant.json (FileNotFoundError when none)."""
    raw = json.loads((directory / TENANT_FILE).read_text(encoding="utf-8"))
    keys = raw.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{directory / TENANT_FILE}: 'keys' must be a list of key hashes")
    return keys


def write_tenant_keys(directory: Path, keys: list[str]) -> None:
    """Replace the key hashes of a tenant.json atomically (readers see old or new)."""
    path = directory / TENANT_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["keys"] = keys
    atomic_write_text(path, json.dumps(raw) + "\n")


class TenantRegistry:
    """Thread-safe map of tenant name -> :class:`Tenant`, persisted under ``root``.

    The ``faiss`` GalleryStore (server/storage/base.py): galleries in this process.
    """

    kind = "faiss"
    remote = False  # searches run on this CPU

    def __init__(
        self,
        root: Path,
        dim: int,
        model_sha256: str,
        embed: Callable[[list[bytes]], np.ndarray] | None = None,
        snapshot_every: int = 1000,
        index: str = "flat",
        tail: TailOptions | None = None,
        role: str = "",
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"faiss store role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.shared = role != ""  # processes of one --workers set share the data dir
        self.follower = role == "reader"
        # without workers, decision ids live in this process only
        self.decision_secret = _decision_secret(root / SECRET_FILE, role) if role else None
        self.root = root / "tenants"
        self.index = index
        self.tail = tail
        self.dim = dim
        self.model_sha256 = model_sha256
        self.embed = embed
        self.snapshot_every = snapshot_every
        self._tenants: dict[str, Tenant] = {}
        self._lock = threading.Lock()
        self._following = threading.Lock()  # a reader's tenant changes, one at a time
        self._tenant_files: dict[Path, tuple[bytes, dict]] = {}
        self._last_tag = 0  # the writer's last token tag (see _next_token_tag)
        self._gone: list[str] = []  # a reader's tenants replaced or dropped, not yet told

    def load_all(self) -> None:
        """Open every tenant found on disk (replaying logs, re-embedding if needed)."""
        if not self.follower:
            self.root.mkdir(parents=True, exist_ok=True)
        stored = self._stored()
        for name, raw in stored:
            if self.follower:  # the writer may delete or create one meanwhile
                self._follow_one(name, raw)
            else:
                self._tenants[name] = self._tenant(name, raw)
        if not self.follower:
            self._last_tag = max([self._stored_tag(), *(_tag(raw) for _, raw in stored)])

    def _stored(self) -> list[tuple[str, dict]]:
        """(name, tenant.json) of every tenant on disk now."""
        out = []
        try:
            directories = sorted(self.root.iterdir())
        except FileNotFoundError:
            return out
        for directory in directories:
            if not NAME.fullmatch(directory.name):
                continue
            try:
                raw = self._read_tenant_file(directory / TENANT_FILE)
            except FileNotFoundError:  # being created, or deleted meanwhile
                continue
            out.append((directory.name, raw))
        named = {self.root / name / TENANT_FILE for name, _ in out}
        self._tenant_files = {p: v for p, v in self._tenant_files.items() if p in named}
        return out

    def _read_tenant_file(self, path: Path) -> dict:
        """A tenant.json, parsed again only when its bytes changed (a reader looks every
        second, and at a call naming a key it does not know). Compared by content: a
        file's inode and times can come back after a delete and create."""
        data = path.read_bytes()
        cached = self._tenant_files.get(path)
        if cached is not None and cached[0] == data:
            return cached[1]
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a JSON object")
        self._tenant_files[path] = (data, raw)
        return raw

    def _tenant(self, name: str, raw: dict) -> Tenant:
        directory = self.root / name
        incarnation = raw.get("incarnation", "")
        gallery = self._open(directory)
        if self.follower:
            gallery.pin(incarnation, lambda: self._incarnation_on_disk(directory))
            if not gallery.same_instance():  # deleted and created again while it loaded
                gallery.close()
                raise ValueError(f"{directory}: created again while it was read")
        gallery.token_tag = _tag(raw)
        return Tenant(name, gallery, list(raw.get("keys", [])), incarnation)

    def _incarnation_on_disk(self, directory: Path) -> str | None:
        """The incarnation ``directory``/tenant.json names now (None: no tenant there)."""
        try:
            return str(self._read_tenant_file(directory / TENANT_FILE).get("incarnation", ""))
        except (OSError, ValueError):
            return None

    def peek(self, name: str) -> Tenant | None:
        """The tenant this process has under ``name`` now, without looking at the disk."""
        with self._lock:
            return self._tenants.get(name)

    def create(self, name: str, key_hash: str | None) -> Tenant:
        check_name(name)
        self._writer_only("create a tenant")
        with self._lock:
            if name in self._tenants:
                raise TenantError(f"tenant {name!r} already exists")
            directory = self.root / name
            tag = self._next_token_tag()
            if directory.exists():  # leftovers of a crash before tenant.json was written
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            gallery = self._open(directory)
            keys = [key_hash] if key_hash else []
            incarnation = new_incarnation()
            record = {
                "name": name,
                "created_at": time.time(),
                "keys": keys,
                "incarnation": incarnation,
                "token_tag": tag,
            }
            atomic_write_text(directory / TENANT_FILE, json.dumps(record) + "\n")
            gallery.token_tag = tag
            tenant = Tenant(name, gallery, keys, incarnation)
            self._tenants[name] = tenant
            return tenant

    def _next_token_tag(self) -> int:
        """A tag greater than every earlier tenant's of this data dir (under ``_lock``).

        Write tokens are ``tag << TOKEN_SHIFT | lsn``, so a tenant created again has
        greater tokens than its earlier instance, and the largest token a client holds is
        always of the newest instance it wrote to (client/retrieval.py keeps the maximum).
        Kept in a file (written before the tenant's), so a tenant deleted and created
        again never gets its old tag back; a lost file is made good from the tenants
        there are. It wraps after 2**24 - 1 creations in one data dir."""
        tag = self._last_tag % (TOKEN_TAGS - 1) + 1
        atomic_write_text(self.root.parent / TAGS_FILE, f"{tag}\n")
        self._last_tag = tag
        return tag

    def _stored_tag(self) -> int:
        path = self.root.parent / TAGS_FILE
        try:
            return int(path.read_text(encoding="ascii"))
        except FileNotFoundError:
            return 0
        except ValueError:
            log.warning("%s is not a number: token tags go on from the tenants' own", path)
            return 0

    def _writer_only(self, what: str) -> None:
        if self.follower:  # server/api/forward.py sends these calls to the writer
            raise ReadOnlyGalleryError(f"a reader worker cannot {what}")

    def _open(self, directory: Path) -> Gallery:
        if self.follower:
            return FollowingGallery.follow(
                directory, self.dim, self.model_sha256, self.embed, self.index, self.tail
            )
        return Gallery.open(
            directory,
            self.dim,
            self.model_sha256,
            self.embed,
            self.snapshot_every,
            self.index,
            self.tail,
        )

    def delete(self, name: str) -> int:
        """Remove the tenant and its data; returns how many items it had."""
        self._writer_only("delete a tenant")
        with self._lock:
            tenant = self._tenants.pop(name, None)
            if tenant is None:
                raise TenantError(f"unknown tenant {name!r}")
        items = tenant.gallery.size
        tenant.gallery.close()
        trash = self.root.parent / "trash" / f"{name}.{time.time_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        (self.root / name).rename(trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        return items

    def get(self, name: str) -> Tenant:
        """The tenant this process has (a reader learns new ones with :meth:`follow`)."""
        with self._lock:
            tenant = self._tenants.get(name)
        if tenant is None:
            raise TenantError(f"unknown tenant {name!r}; create it with the Admin service")
        return tenant

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tenants)

    def all(self) -> list[Tenant]:
        with self._lock:
            return list(self._tenants.values())

    def sizes(self) -> dict[str, int]:
        return {t.name: t.gallery.size for t in self.all()}

    def close(self) -> None:
        for tenant in self.all():
            tenant.gallery.close()

    def refresh(self) -> dict[str, list[str]]:
        """Tenants and key hashes as stored. A reader reads them from disk (the writer's
        creations, deletions and keys) and catches every gallery up with its log."""
        if self.follower:
            self._follow_tenants()
        return {t.name: list(t.key_hashes) for t in self.all()}

    def follow(self, name: str) -> Tenant | None:
        """A reader's look at one tenant on disk now: opened when new (or created again),
        its keys re-read; None when the writer has no such tenant. The miss path of a
        call naming a tenant or key this reader has not refreshed yet."""
        if not self.follower or not NAME.fullmatch(name):
            return None
        with self._following:
            try:
                raw = self._read_tenant_file(self.root / name / TENANT_FILE)
            except (OSError, ValueError):
                return None
            return self._follow_one(name, raw)

    def _follow_one(self, name: str, raw: dict) -> Tenant | None:
        """Under ``_following``: the tenant ``raw`` describes, opened if this process has
        another instance or none; the instance it replaces is closed."""
        with self._lock:
            tenant = self._tenants.get(name)
        if tenant is not None and raw.get("incarnation", "") == tenant.incarnation:
            tenant.key_hashes = list(raw.get("keys", []))
            return tenant
        try:
            fresh = self._tenant(name, raw)
        except (OSError, ValueError) as err:  # deleted while read: the next look
            log.info("%s: not followed now: %s", name, err)
            return None
        with self._lock:
            self._tenants[name] = fresh
            if tenant is not None:
                self._gone.append(name)
            if fresh.gallery.model_sha256 != self.model_sha256:  # opened during a switch
                fresh.gallery.stale_model = True
        if tenant is not None:
            tenant.gallery.close()
        return fresh

    def gone(self) -> list[str]:
        """The tenants whose instance this reader replaced or dropped since the last call
        (each told once: the caller makes monitoring forget them)."""
        with self._lock:
            names, self._gone = self._gone, []
        return names

    def _follow_tenants(self) -> None:
        """A reader's refresh: the writer's tenants and keys as stored, galleries caught up.
        One tenant that cannot be read now (deleted while read, a writer mid-compaction)
        is logged and looked at again next time; the others are followed all the same."""
        with self._following:
            stored = dict(self._stored())
            with self._lock:
                gone = [t for n, t in self._tenants.items() if n not in stored]
                for tenant in gone:
                    del self._tenants[tenant.name]
                    self._gone.append(tenant.name)
            for tenant in gone:
                tenant.gallery.close()
            stale = []
            for name, raw in stored.items():
                try:
                    tenant = self._follow_one(name, raw)
                    if tenant is None:
                        continue
                    if tenant.gallery.stale_model:
                        stale.append(tenant)
                    else:
                        tenant.gallery.catch_up()
                except Exception:
                    log.exception("%s: not followed this time", name)
        for tenant in stale:  # re-embedded: not under the lock the miss path waits for
            self._renew(tenant)

    def _renew(self, tenant: Tenant) -> None:
        """Read a gallery opened on the model before a reload again on this process's."""
        tenant.gallery.stale_model = False  # set again if another switch comes meanwhile
        try:
            tenant.gallery.reopen(self.model_sha256, self.dim, self.embed)
        except Exception:
            tenant.gallery.stale_model = True
            log.exception("%s: not read again on the new model this time", tenant.name)

    def reopen(self, model_sha256: str, dim: int, embed) -> Callable[[], int]:
        """A reader's reload, in two steps. This one (slow: items of another model are
        re-embedded here) reads every gallery again from the writer's files, while the
        old ones keep serving and following; the function it returns switches them all
        at once (quick: the caller runs it in the same step as its own switch to the new
        model) and returns how many items were re-embedded. A tenant opened or created
        again in between is read again on the new model by the next refresh."""
        fresh: list[tuple[Tenant, FollowingGallery]] = []
        try:
            for tenant in self.all():
                gallery = FollowingGallery.follow(
                    tenant.gallery.directory, dim, model_sha256, embed, self.index, self.tail
                )
                fresh.append((tenant, gallery))
                gallery.pin(*tenant.gallery.pinned)
                if not gallery.same_instance():  # created again: the refresh opens it
                    fresh.pop()
                    gallery.close()
        except BaseException:
            for _, gallery in fresh:
                gallery.close()
            raise

        def switch() -> int:
            for tenant, gallery in fresh:
                if self.peek(tenant.name) is tenant:
                    tenant.gallery.adopt(gallery)
                else:  # deleted or created again meanwhile
                    gallery.close()
            self.switch_model(model_sha256, dim, embed)
            with self._lock:  # opened meanwhile on the old model: the refresh renews them
                for tenant in self._tenants.values():
                    if tenant.gallery.model_sha256 != model_sha256:
                        tenant.gallery.stale_model = True
            return sum(g.reembedded for _, g in fresh)

        return switch

    def switch_model(self, model_sha256: str, dim: int, embed) -> None:
        """After a reload re-embedded every gallery: new tenants use the new model."""
        self.model_sha256, self.dim, self.embed = model_sha256, dim, embed

    def describe_index(self) -> str:
        return describe_index(self.index)

    def prepare_thread(self, threads: int) -> None:
        faiss.omp_set_num_threads(threads)

    # ------------------------------------------------------------------ traffic
    def publish_traffic(self, tenant: str, replica: str, blob: bytes) -> None:
        """Replace this replica's evidence file of ``tenant`` (atomic; fsync skipped: the
        evidence is soft state, a lost update only delays it)."""
        directory = self.root / tenant / TRAFFIC_DIR
        directory.mkdir(exist_ok=True)
        atomic_write_bytes(directory / self._traffic_name(replica), blob)

    def read_traffic(self, since: int) -> list[TrafficRow]:
        prefix = self.model_sha256[:16] + "-"
        rows = []
        for name in self.names():
            directory = self.root / name / TRAFFIC_DIR
            try:
                entries = list(directory.iterdir())
            except FileNotFoundError:
                continue
            for path in entries:
                if not (path.name.startswith(prefix) and path.suffix == ".bin"):
                    continue
                try:
                    stamp = path.stat().st_mtime_ns
                    if stamp >= since:
                        replica = path.stem[len(prefix) :]
                        rows.append(TrafficRow(name, replica, stamp, path.read_bytes()))
                except FileNotFoundError:  # replaced or deleted meanwhile: the next read
                    continue
        return rows

    def _traffic_name(self, replica: str) -> str:
        return f"{self.model_sha256[:16]}-{replica}.bin"


def _tag(raw: dict) -> int:
    """A tenant.json's token tag (0: written before tags)."""
    try:
        return int(raw.get("token_tag", 0))
    except (TypeError, ValueError):
        return 0


def _decision_secret(path: Path, role: str) -> bytes:
    """The HMAC key of decision ids shared by the workers of one data dir: made by the
    writer (which starts first) when there is none, read by the readers."""
    if role == "writer" and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()
