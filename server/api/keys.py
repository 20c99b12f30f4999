"""API keys while the server runs: re-read when their files change, rotated without a restart.

The running server re-reads the key file (``--api-keys``) and each tenant's
``tenant.json`` whenever one changes (checked every ``--keys-poll-seconds``, and at
once on SIGHUP): the keys a file lists replace the ones it listed before, so a new
key works and a removed key stops working within one poll. A key file that does not
parse is refused with an error in the log and the previous keys stay in force.

Rotation is "add the new key, move the clients over, revoke the old one"::

    python -m server.api.keys rotate --data-dir out/server acme     # prints acme's new key
    python -m server.api.keys list   --data-dir out/server acme     # key ids of acme's keys
    python -m server.api.keys revoke --data-dir out/server acme sha256:1f0c9a2b7d3e
    python -m server.api.keys hash 'a-new-admin-key'                # sha256:... for the key file

Admin keys live in the key file: add the new one's hash (``hash``), deploy, remove
the old one. Only hashes are ever written; ``rotate`` prints the new key once and
appends a record (no secret) to the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from pathlib import Path

from server.api.audit import AuditLog
from server.auth import KeyRing, Principal, hash_key, key_id, new_key, read_key_file
from server.storage.base import NAME
from server.storage.faiss.tenants import TENANT_FILE, read_tenant_keys, write_tenant_keys

log = logging.getLogger(__name__)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeyReloader:
    """Keeps a :class:`KeyRing` in step with the key file and the tenants' tenant.json.

    Runs on the event loop thread, like the deletion of a tenant's keys after
    DeleteTenant, so a tenant.json read here can never resurrect the keys of a
    deleted tenant: either the folder was already gone or the deletion comes after.
    """

    def __init__(self, ring: KeyRing, key_file: Path | None, data_dir: Path) -> None:
        self.ring = ring
        self.key_file = key_file
        self.tenants_root = data_dir / "tenants"
        self._seen: dict[Path, tuple[int, int, int] | None] = {}

    def poll(self, force: bool = False) -> list[str]:
        """Re-read every key source whose file changed; returns the sources reloaded."""
        reloaded = []
        if self.key_file is not None and self._changed(self.key_file, force):
            try:
                self.ring.set_source("file", read_key_file(self.key_file))
                reloaded.append("file")
            except ValueError as err:
                log.error("key file not reloaded, the previous keys stay in force: %s", err)
        if self.tenants_root.is_dir():
            for directory in sorted(self.tenants_root.iterdir()):
                if not NAME.fullmatch(directory.name):
                    continue
                if not self._changed(directory / TENANT_FILE, force):
                    continue
                try:
                    hashes = read_tenant_keys(directory)
                except FileNotFoundError:
                    continue  # being created or deleted right now
                except ValueError as err:
                    log.error("keys of tenant %s not reloaded: %s", directory.name, err)
                    continue
                tenant = Principal(False, directory.name)
                self.ring.set_source(f"tenant:{directory.name}", [(h, tenant) for h in hashes])
                reloaded.append(f"tenant:{directory.name}")
        if reloaded:
            log.info("API keys reloaded from %s", ", ".join(reloaded))
        return reloaded

    def _changed(self, path: Path, force: bool) -> bool:
        signature = _signature(path)
        changed = force or self._seen.get(path, ()) != signature
        self._seen[path] = signature
        return changed and signature is not None

    async def watch(self, interval: float) -> None:
        """Poll every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
            except OSError as err:  # a flaky disk must not end key reloading for good
                log.error("API key reload failed: %s", err)


# ---------------------------------------------------------------------- CLI
def _tenant_dir(data_dir: Path, tenant: str) -> Path:
    directory = data_dir / "tenants" / tenant
    if not NAME.fullmatch(tenant) or not (directory / TENANT_FILE).is_file():
        raise FileNotFoundError(f"no tenant {tenant!r} under {data_dir / 'tenants'}")
    return directory


def _audit(args: argparse.Namespace, method: str, **fields) -> None:
    audit = AuditLog(args.audit_log or args.data_dir / "audit.log")
    try:
        caller = {"local_user": getpass.getuser(), "pid": os.getpid()}
        audit.record(method, "OK", caller=caller, **fields)
    finally:
        audit.close()


def rotate(args: argparse.Namespace) -> int:
    directory = _tenant_dir(args.data_dir, args.tenant)
    key = new_key()
    keys = [*read_tenant_keys(directory), hash_key(key)]
    write_tenant_keys(directory, keys)
    _audit(args, "RotateKey", request={"tenant": args.tenant}, key_id=key_id(hash_key(key)))
    print(json.dumps({"tenant": args.tenant, "api_key": key, "key_id": key_id(hash_key(key))}))
    print(
        f"the old keys of {args.tenant!r} still work: revoke them once clients use the new one",
        file=sys.stderr,
    )
    return 0


def revoke(args: argparse.Namespace) -> int:
    directory = _tenant_dir(args.data_dir, args.tenant)
    keys = read_tenant_keys(directory)
    kept = [k for k in keys if key_id(k) != args.key_id and k != args.key_id]
    if len(kept) == len(keys):
        print(f"error: tenant {args.tenant!r} has no key {args.key_id!r}", file=sys.stderr)
        return 1
    write_tenant_keys(directory, kept)
    _audit(args, "RevokeKey", request={"tenant": args.tenant}, key_id=args.key_id)
    print(json.dumps({"tenant": args.tenant, "revoked": args.key_id, "keys_left": len(kept)}))
    return 0


def list_keys(args: argparse.Namespace) -> int:
    keys = read_tenant_keys(_tenant_dir(args.data_dir, args.tenant))
    print(json.dumps({"tenant": args.tenant, "key_ids": [key_id(k) for k in keys]}))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server.api.keys",
        description="Rotate tenant API keys of a server's data dir; the running server "
        "picks the change up without a restart.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("rotate", "add a new key to a tenant and print it (old keys keep working)"),
        ("list", "print the key ids of a tenant's keys"),
        ("revoke", "remove a tenant key by its key id (or its full sha256: hash)"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--data-dir", type=Path, default=Path("out/server"))
        s.add_argument("--audit-log", type=Path, help="default: DATA_DIR/audit.log")
        s.add_argument("tenant")
        if name == "revoke":
            s.add_argument("key_id")
    s = sub.add_parser("hash", help="print the sha256: form of a key, for the key file")
    s.add_argument("key")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "hash":
        print(hash_key(args.key))
        return 0
    try:
        return {"rotate": rotate, "revoke": revoke, "list": list_keys}[args.command](args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
