"""API keys while the server runs: sources replaced whole, files re-read when they change,
and the rotation CLI (server/api/keys.py). The live rotation is in tests/test_server_security.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest

from server.api.audit import read_records
from server.api.keys import KeyReloader, main
from server.auth import AuthError, KeyRing, Principal, hash_key, key_id
from server.storage.faiss.tenants import TenantRegistry


def may(ring: KeyRing, key: str, tenant: str | None = None, admin: bool = False) -> bool:
    try:
        ring.authorize((("x-api-key", key),), tenant, admin)
        return True
    except AuthError:
        return False


def write_keys(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc))
    stamp = path.stat().st_mtime_ns + 1_000_000  # a new mtime even within one tick
    os.utime(path, ns=(stamp, stamp))


def test_sources_are_replaced_whole(tmp_path: Path) -> None:
    ring = KeyRing()
    ring.set_source("file", [(hash_key("old-admin"), Principal(True, None))])
    ring.add(hash_key("t1"), Principal(False, "t"))
    assert may(ring, "old-admin", admin=True) and may(ring, "t1", "t")
    ring.set_source("file", [(hash_key("new-admin"), Principal(True, None))])
    assert not may(ring, "old-admin", admin=True) and may(ring, "new-admin", admin=True)
    assert may(ring, "t1", "t")  # another source is untouched
    ring.forget_tenant("t")
    assert not may(ring, "t1", "t")


def test_reloader_follows_the_key_file_and_tenant_files(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    write_keys(key_file, {"admin": ["admin-1"]})
    registry = TenantRegistry(tmp_path / "data", 4, "sha")
    registry.create("acme", hash_key("acme-1"))
    ring = KeyRing.from_file(key_file)
    reloader = KeyReloader(ring, key_file, tmp_path / "data")
    assert set(reloader.poll()) == {"file", "tenant:acme"}
    assert reloader.poll() == []  # nothing changed
    assert may(ring, "acme-1", "acme")

    write_keys(key_file, {"admin": ["admin-2"]})
    assert reloader.poll() == ["file"]
    assert may(ring, "admin-2", admin=True) and not may(ring, "admin-1", admin=True)

    write_keys(key_file, {"admin": "not a list"})  # a broken edit keeps the keys in force
    assert reloader.poll() == []
    assert may(ring, "admin-2", admin=True)

    assert main(["rotate", "--data-dir", str(tmp_path / "data"), "acme"]) == 0
    assert reloader.poll() == ["tenant:acme"]
    hashes = json.loads((tmp_path / "data/tenants/acme/tenant.json").read_text())["keys"]
    assert len(hashes) == 2 and hashes[0] == hash_key("acme-1")
    assert may(ring, "acme-1", "acme")  # the old key works until revoked
    assert main(["revoke", "--data-dir", str(tmp_path / "data"), "acme", key_id(hashes[0])]) == 0
    reloader.poll()
    assert not may(ring, "acme-1", "acme")
    with pytest.raises(AuthError) as err:
        ring.authorize((("x-api-key", "acme-1"),), "acme")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_rotation_cli_prints_the_key_once_and_audits_without_it(tmp_path: Path, capsys) -> None:
    registry = TenantRegistry(tmp_path, 4, "sha")
    registry.create("acme", hash_key("first"))
    assert main(["rotate", "--data-dir", str(tmp_path), "acme"]) == 0
    printed = json.loads(capsys.readouterr().out)
    new = printed["api_key"]
    assert printed["key_id"] == key_id(hash_key(new))
    stored = (tmp_path / "tenants/acme/tenant.json").read_text()
    assert new not in stored and hash_key(new) in stored
    assert main(["list", "--data-dir", str(tmp_path), "acme"]) == 0
    assert json.loads(capsys.readouterr().out)["key_ids"] == [
        key_id(hash_key("first")),
        key_id(hash_key(new)),
    ]
    assert main(["revoke", "--data-dir", str(tmp_path), "acme", "sha256:nothing"]) == 1
    assert main(["rotate", "--data-dir", str(tmp_path), "nobody"]) == 2
    assert main(["rotate", "--data-dir", str(tmp_path), "../acme"]) == 2
    capsys.readouterr()
    assert main(["hash", "k"]) == 0 and capsys.readouterr().out.strip() == hash_key("k")
    (record,) = read_records(tmp_path / "audit.log")
    assert record["method"] == "RotateKey" and record["request"] == {"tenant": "acme"}
    assert new not in (tmp_path / "audit.log").read_text()
