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
from dataclasses import dataclass
from pathlib import Path

import grpc

METADATA_KEY = "x-api-key"
_PREFIX = "sha256:"


class AuthError(Exception):
    """Refused call: ``code`` is UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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


class KeyRing:
    """Hashed keys of admins and tenants; thread-safe."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._entries: list[tuple[str, Principal]] = []
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        """Read a key file; errors name the file and what is wrong."""
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
        ring = cls(enabled=True)
        for entry in admin:
            ring.add(_as_hash(str(entry)), Principal(True, None))
        for tenant, keys in tenants.items():
            if not isinstance(keys, list):
                raise ValueError(f"{path}: keys of tenant {tenant!r} must be a list")
            for entry in keys:
                ring.add(_as_hash(str(entry)), Principal(False, tenant))
        if not ring._entries:
            raise ValueError(f"{path}: holds no keys; add an admin key or run with --no-auth")
        return ring

    def add(self, key_hash: str, principal: Principal) -> None:
        with self._lock:
            self._entries.append((key_hash, principal))

    def forget_tenant(self, tenant: str) -> None:
        with self._lock:
            self._entries = [(h, p) for h, p in self._entries if p.tenant != tenant]

    def identify(self, key: str) -> Principal | None:
        """The key's owner; compares against every stored hash in constant time."""
        presented = hash_key(key).encode()
        found = None
        with self._lock:
            entries = list(self._entries)
        for stored, principal in entries:
            if hmac.compare_digest(stored.encode(), presented) and found is None:
                found = principal
        return found

    def authorize(
        self, metadata: tuple | None, tenant: str | None = None, admin: bool = False
    ) -> None:
        """Raise :class:`AuthError` unless the call's key may act on ``tenant`` / as admin."""
        if not self.enabled:
            return
        keys = [v for k, v in (metadata or ()) if k == METADATA_KEY]
        if not keys:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, f"missing API key: send metadata {METADATA_KEY}"
            )
        principal = self.identify(str(keys[0]))
        if principal is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        if principal.admin:
            return
        if admin:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, "this call needs an admin key")
        if tenant is not None and principal.tenant != tenant:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED, f"this key does not grant tenant {tenant!r}"
            )
