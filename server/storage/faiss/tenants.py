"""The tenants of a data dir: one directory, one gallery and hashed keys per tenant.

Layout: ``<data-dir>/tenants/<name>/tenant.json`` (name, creation time, key hashes,
incarnation) next to the gallery's ``snapshot.npz`` and ``wal.log``, and
``traffic/<model>-<replica>.bin``: each serving process's published traffic evidence
(server/matching/statistics.py), rewritten atomically, so processes sharing the data dir
read each other's. A tenant exists once its ``tenant.json`` is written (atomically);
deletion renames the directory away first, so a crash never leaves half a tenant visible.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from contracts.files import atomic_write_bytes, atomic_write_text, fsync_dir
from server.storage.base import NAME, Tenant, TenantError, TrafficRow, check_name, new_incarnation
from server.storage.faiss.gallery import Gallery, TailOptions, describe_index

log = logging.getLogger(__name__)

TENANT_FILE = "tenant.json"
TRAFFIC_DIR = "traffic"


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
    shared = False  # one process owns a data dir
    decision_secret = None  # decision ids live in this process only

    def __init__(
        self,
        root: Path,
        dim: int,
        model_sha256: str,
        embed: Callable[[list[bytes]], np.ndarray] | None = None,
        snapshot_every: int = 1000,
        index: str = "flat",
        tail: TailOptions | None = None,
    ) -> None:
        self.root = root / "tenants"
        self.index = index
        self.tail = tail
        self.dim = dim
        self.model_sha256 = model_sha256
        self.embed = embed
        self.snapshot_every = snapshot_every
        self._tenants: dict[str, Tenant] = {}
        self._lock = threading.Lock()

    def load_all(self) -> None:
        """Open every tenant found on disk (replaying logs, re-embedding if needed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for directory in sorted(self.root.iterdir()):
            meta = directory / TENANT_FILE
            if not meta.is_file() or not NAME.fullmatch(directory.name):
                continue
            raw = json.loads(meta.read_text(encoding="utf-8"))
            gallery = self._open(directory)
            keys, incarnation = raw.get("keys", []), raw.get("incarnation", "")
            self._tenants[directory.name] = Tenant(directory.name, gallery, keys, incarnation)

    def create(self, name: str, key_hash: str | None) -> Tenant:
        check_name(name)
        with self._lock:
            if name in self._tenants:
                raise TenantError(f"tenant {name!r} already exists")
            directory = self.root / name
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
            }
            atomic_write_text(directory / TENANT_FILE, json.dumps(record) + "\n")
            tenant = Tenant(name, gallery, keys, incarnation)
            self._tenants[name] = tenant
            return tenant

    def _open(self, directory: Path) -> Gallery:
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
        """Tenants and key hashes as stored (no other process changes them here)."""
        return {t.name: list(t.key_hashes) for t in self.all()}

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
