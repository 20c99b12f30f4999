"""Security of the running server, end to end: TLS and mTLS with a real client, API keys
rotated without a restart, per-tenant rate limits that starve nobody, the audit log.

Each test starts ``python -m server`` as an operator would (testing/server_fixtures.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from retrieval.v1.metadata import retry_after_of

from client import RetrievalClient
from server.api.audit import read_records
from server.auth import hash_key, key_id
from testing import server_fixtures
from testing.server_fixtures import ROOT, Assets, make_pki, start_server

server_assets = server_fixtures.server_assets
pytestmark = pytest.mark.slow
ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}", "PATH": "/usr/bin:/bin"}


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    root = tmp_path_factory.mktemp("pki")
    return make_pki(root / "ours"), make_pki(root / "theirs", ca="other-ca")


def test_tls_with_api_keys(server_assets: Assets, tmp_path: Path, pki) -> None:
    ours, theirs = pki
    server = start_server(
        server_assets, tmp_path, "--api-keys", str(server_assets.keys),
        "--tls-cert", str(ours / "server.pem"), "--tls-key", str(ours / "server.key"),
    )  # fmt: skip
    try:
        admin_key = server_fixtures.ADMIN_KEY
        with RetrievalClient(server.address, admin_key, tls_ca=ours / "ca.pem") as client:
            key = client.create_tenant("tls")
        with RetrievalClient(server.address, key, tls_ca=ours / "ca.pem", timeout=10) as client:
            client.enroll("tls", "t", server_assets.png(0))
            assert client.match("tls", server_assets.png(0)).item_id == "t"
            assert code_of(client.list_tenants) == grpc.StatusCode.PERMISSION_DENIED
        with RetrievalClient(server.address, key, tls_ca=theirs / "ca.pem", timeout=5) as wrong:
            assert code_of(lambda: wrong.match("tls", b"x")) == grpc.StatusCode.UNAVAILABLE
        with RetrievalClient(server.address, key, timeout=5) as plaintext:
            assert code_of(lambda: plaintext.match("tls", b"x")) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_mtls_refuses_a_client_certificate_from_another_ca(
    server_assets: Assets, tmp_path: Path, pki
) -> None:
    ours, theirs = pki
    server = start_server(
        server_assets, tmp_path, "--no-auth",
        "--tls-cert", str(ours / "server.pem"), "--tls-key", str(ours / "server.key"),
        "--tls-client-ca", str(ours / "ca.pem"),
    )  # fmt: skip
    try:
        trusted = {"tls_ca": ours / "ca.pem", "timeout": 5}
        with RetrievalClient(
            server.address, tls_cert=ours / "client.pem", tls_key=ours / "client.key", **trusted
        ) as client:
            assert client.list_tenants() == []
        with RetrievalClient(
            server.address, tls_cert=theirs / "client.pem", tls_key=theirs / "client.key", **trusted
        ) as stranger:
            assert code_of(stranger.list_tenants) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_keys_rotate_without_a_restart(server_assets: Assets, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"admin": ["admin-one"]}))
    data = tmp_path / "data"
    server = start_server(
        server_assets, data, "--api-keys", str(key_file), "--keys-poll-seconds", "0.1"
    )
    pid = server.proc.pid

    def works(key: str, tenant: str | None = None) -> bool:
        with RetrievalClient(server.address, key, timeout=10) as client:
            try:
                client.get_tenant(tenant) if tenant else client.list_tenants()
                return True
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
                return False

    def keys_cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "server.api.keys", *args, "--data-dir", str(data)],
            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60, check=True,
        )  # fmt: skip
        return out.stdout

    try:
        with RetrievalClient(server.address, "admin-one") as admin:
            first = admin.create_tenant("acme")
        new = json.loads(keys_cli("rotate", "acme"))["api_key"]
        assert wait_until(lambda: works(new, "acme"))
        assert works(first, "acme")  # both work until the old one is revoked
        keys_cli("revoke", "acme", key_id(hash_key(first)))
        assert wait_until(lambda: not works(first, "acme"))
        assert works(new, "acme")
        # admin keys: add the new one to the key file, then remove the old one
        key_file.write_text(json.dumps({"admin": ["admin-one", hash_key("admin-two")]}))
        assert wait_until(lambda: works("admin-two"))
        key_file.write_text(json.dumps({"admin": [hash_key("admin-two")]}))
        assert wait_until(lambda: not works("admin-one"))
        key_file.write_text("{ broken")  # a bad edit: the keys in force stay
        time.sleep(0.5)
        assert works("admin-two") and works(new, "acme")
        assert "key file not reloaded" in server.log()
        assert server.proc.pid == pid and server.proc.poll() is None  # never restarted
        methods = [r["method"] for r in read_records(data / "audit.log")]
        assert methods[:3] == ["CreateTenant", "RotateKey", "RevokeKey"]
    finally:
        server.stop()


def test_a_flooding_tenant_is_limited_and_starves_nobody(
    server_assets: Assets, tmp_path: Path
) -> None:
    rate, burst, seconds = 40, 20, 3.0
    server = start_server(
        server_assets, tmp_path, "--no-auth", "--tenant-rate", str(rate),
        "--tenant-burst", str(burst),
    )  # fmt: skip
    codes = {"flood": Counter(), "calm": Counter()}
    hints: list[float] = []
    try:
        with RetrievalClient(server.address, timeout=30) as client:
            for name in codes:
                client.create_tenant(name)
                client.enroll(name, "a", server_assets.png(0))
            time.sleep(burst / rate)  # the enrolments spent tokens: refill both buckets
            stop = time.monotonic() + seconds

            def caller(name: str, pause: float) -> None:
                while time.monotonic() < stop:
                    try:
                        client.match(name, server_assets.png(1))
                        codes[name]["OK"] += 1
                    except grpc.RpcError as err:
                        codes[name][err.code().name] += 1
                        hints.append(retry_after_of(err) or -1.0)
                    time.sleep(pause)

            threads = [threading.Thread(target=caller, args=("flood", 0)) for _ in range(6)]
            threads.append(threading.Thread(target=caller, args=("calm", 0.1)))  # ~10/s
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - started
    finally:
        server.stop()
    assert set(codes["flood"]) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["flood"]["OK"] <= rate * elapsed + burst + 1  # the bucket held
    assert codes["calm"]["OK"] >= 10 and set(codes["calm"]) == {"OK"}, codes
    assert hints and all(0 < h <= 1 / rate + 1e-3 for h in hints)  # one image's refill


def test_audit_log_of_a_real_server_holds_no_secret(server_assets: Assets, tmp_path: Path):
    audit = tmp_path / "admin-audit.log"
    server = start_server(
        server_assets, tmp_path / "data", "--api-keys", str(server_assets.keys),
        "--audit-log", str(audit),
    )  # fmt: skip
    admin_key = server_fixtures.ADMIN_KEY
    try:
        with RetrievalClient(server.address, admin_key) as admin:
            tenant_key = admin.create_tenant("audited")
            admin.list_tenants()
            assert code_of(lambda: admin.reload("/nowhere.onnx")) == (
                grpc.StatusCode.FAILED_PRECONDITION
            )
            admin.delete_tenant("audited")
        with RetrievalClient(server.address, "static-key") as tenant:
            assert code_of(lambda: tenant.create_tenant("mine")) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
    finally:
        server.stop()
    records = read_records(audit)
    assert [(r["method"], r["code"]) for r in records] == [
        ("CreateTenant", "OK"),
        ("ListTenants", "OK"),
        ("Reload", "FAILED_PRECONDITION"),
        ("DeleteTenant", "OK"),
        ("CreateTenant", "PERMISSION_DENIED"),
    ]
    assert records[2]["request"] == {"model_path": "/nowhere.onnx"}
    assert records[4]["caller"] == {
        "admin": False, "tenant": "static", "key_id": key_id(hash_key("static-key")),
    }  # fmt: skip
    text = audit.read_text()
    for secret in (admin_key, tenant_key, "static-key", hash_key(admin_key)):
        assert secret not in text
