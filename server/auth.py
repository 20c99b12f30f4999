"""API keys: who may call what.

Keys travel in call metadata ``x-api-key``. Only SHA-256 hashes are stored (a leaked
data dir or key file gives no usable key) and a presented key is compared with every
stored hash in constant time. An admin key reaches every tenant and the Admin
service; a tenant key reaches only its own tenant. Auth is off only when the
operator says ``--no-auth``; there is no silent default.

Key file (``--api-keys FILE``), JSON; entries are plain keys or ``sha256:<hex>``::

    {"admin": ["sha256:..."], "tenants": {"acme": ["plain-key-or-hash"]}}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from retrieval.v1.metadata import API_KEY

from server.errors import StatusError

_PREFIX = "sha256:"


class AuthError(StatusError):
    """Refused call: ``code`` is UNAUTHENTICATED or PERMISSION_DENIED.

    ``principal`` is the key's owner when the key was known (PERMISSION_DENIED), so
    the audit log can say who tried.
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, principal: Principal | None = None
    ) -> None:
        super().__init__(code, message)
        self.principal = principal


def hash_key(key: str) -> str:
    return _PREFIX + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (192 bits)."""
    return "tcm_" + secrets.token_urlsafe(24)


def _as_hash(entry: str) -> str:
    if entry.startswith(_PREFIX) and len(entry) == len(_PREFIX) + 64:
        return entry
    if not entry:
        raise ValueError("empty API key in the key file")
    return hash_key(entry)


@dataclass(frozen=True)
class Principal:
    admin: bool
    tenant: str | None
    # Names the key in the audit log without revealing it: the first 12 hex digits of
    # the stored hash, which an operator finds in the key file or tenant.json.
    key_id: str = ""


AUTH_OFF = Principal(True, None, "auth-off")


def key_id(key_hash: str) -> str:
    return key_hash[: len(_PREFIX) + 12]


def read_key_file(path: Path) -> list[tuple[str, Principal]]:
    """(hash, principal) entries of a key file; errors name the file and what is wrong."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"API key file not found: {path}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict) or set(raw) - {"admin", "tenants"}:
        raise ValueError(f'{path}: expected {{"admin": [...], "tenants": {{name: [...]}}}}')
    admin, tenants = raw.get("admin", []), raw.get("tenants", {})
    if not isinstance(admin, list) or not isinstance(tenants, dict):
        raise ValueError(f'{path}: "admin" must be a list and "tenants" an object')
    entries = [(_as_hash(str(entry)), Principal(True, None)) for entry in admin]
    for tenant, keys in tenants.items():
        if not isinstance(keys, list):
            raise ValueError(f"{path}: keys of tenant {tenant!r} must be a list")
        entries += [(_as_hash(str(entry)), Principal(False, tenant)) for entry in keys]
    if not entries:
        raise ValueError(f"{path}: holds no keys; add an admin key or run with --no-auth")
    return entries


class KeyRing:
    """Hashed keys of admins and tenants, grouped by where they come from; thread-safe.

    Sources (``"file"`` for the key file, ``"tenant:<name>"`` for a tenant's
    tenant.json) are replaced whole by :meth:`set_source`, which is how keys are
    rotated while the server runs (server/api/keys.py re-reads them when they change).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._sources: dict[str, list[tuple[str, Principal]]] = {}
        self._entries: list[tuple[str, Principal]] = []
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        """Read a key file; errors name the file and what is wrong."""
        ring = cls(enabled=True)
        ring.set_source("file", read_key_file(path))
        return ring

    def set_source(self, source: str, entries: list[tuple[str, Principal]]) -> None:
        """Replace every key of ``source`` (keys not listed any more stop working now)."""
        with self._lock:
            self._sources[source] = [(h, replace(p, key_id=key_id(h))) for h, p in entries]
            self._rebuild()

    def add(self, key_hash: str, principal: Principal) -> None:
        """Add one key; a tenant's key joins that tenant's source."""
        source = f"tenant:{principal.tenant}" if principal.tenant else "runtime"
        with self._lock:
            entry = (key_hash, replace(principal, key_id=key_id(key_hash)))
            self._sources.setdefault(source, []).append(entry)
            self._rebuild()

    def tenants(self) -> set[str]:
        """Tenants that have keys of their own here."""
        with self._lock:
            return {s.split(":", 1)[1] for s in self._sources if s.startswith("tenant:")}

    def forget_tenant(self, tenant: str) -> None:
        with self._lock:
            self._sources.pop(f"tenant:{tenant}", None)
            for source, entries in self._sources.items():
                self._sources[source] = [(h, p) for h, p in entries if p.tenant != tenant]
            self._rebuild()

    def _rebuild(self) -> None:
        self._entries = [e for entries in self._sources.values() for e in entries]

    def identify(self, key: str) -> Principal | None:
        """The key's owner; compares against every stored hash in constant time."""
        presented = hash_key(key).encode()
        found = None
        with self._lock:
            entries = self._entries  # replaced, never mutated in place
        for stored, principal in entries:
            if hmac.compare_digest(stored.encode(), presented) and found is None:
                found = principal
        return found

    def authorize(
        self, metadata: tuple | None, tenant: str | None = None, admin: bool = False
    ) -> Principal:
        """The caller, if its key may act on ``tenant`` / as admin; else :class:`AuthError`."""
        if not self.enabled:
            return AUTH_OFF
        keys = [v for k, v in (metadata or ()) if k == API_KEY]
        if not keys:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, f"missing API key: send metadata {API_KEY}"
            )
        principal = self.identify(str(keys[0]))
        if principal is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        if principal.admin:
            return principal
        if admin:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED, "this call needs an admin key", principal
            )
        if tenant is not None and principal.tenant != tenant:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this key does not grant tenant {tenant!r}",
                principal,
            )
        return principal
