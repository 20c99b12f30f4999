"""The audit log: who did what to the server's tenants and model, and how it ended.

Every call of the Admin service (CreateTenant, DeleteTenant, ListTenants, Reload),
refused ones included, and every key rotation made with ``python -m server.api.keys``
appends one JSON line::

    {"time": "2026-12-01T21:40:00.123Z", "method": "CreateTenant", "code": "OK",
     "caller": {"admin": true, "tenant": null, "key_id": "sha256:1f0c9a2b7d3e"},
     "peer": "ipv4:127.0.0.1:53412", "request": {"tenant": "acme"}, "seconds": 0.004}

It never holds a secret: no API key (callers are named by ``key_id``, the first 12
hex digits of the key's stored SHA-256 hash, which the operator finds in the key file
or tenant.json), no response (CreateTenant's reply carries the new key) and no
image. Each line is flushed and fsynced before the call's status is sent, so an
acknowledged admin action is on disk with its audit record.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

# Request fields that are never written, whatever message they appear in.
SECRET_FIELDS = frozenset({"api_key", "key", "image", "images", "items"})
MAX_VALUE_CHARS = 256


def request_summary(request: Any) -> dict[str, Any]:
    """The set scalar fields of a protobuf request, minus secrets and payloads."""
    out: dict[str, Any] = {}
    for field, value in request.ListFields():
        if field.name in SECRET_FIELDS or field.type in (field.TYPE_BYTES, field.TYPE_MESSAGE):
            continue
        out[field.name] = [_clip(v) for v in value] if field.is_repeated else _clip(value)
    return out


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + "..."
    return value


class AuditLog:
    """Appends JSON lines to ``path`` (created with mode 0600); thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._lock = threading.Lock()

    def record(self, method: str, code: str, **fields: Any) -> None:
        """Append one record and fsync it."""
        now = time.time()
        millis = int(now % 1 * 1000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{millis:03d}Z"
        entry = {"time": stamp, "method": method, "code": code, **fields}
        line = (json.dumps(entry, default=str, ensure_ascii=True) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                raise RuntimeError(f"audit log {self.path} is closed")
            os.write(self._fd, line)
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit log, oldest first (for tests and tooling)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
