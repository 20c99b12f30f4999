"""The server end to end: ``python -m server`` on loopback, real grpc, onnxruntime, faiss.

The model is a tiny seeded linear embedder with a calibration measured on the same
glyph images (testing/server_fixtures.py), so expected similarities are known exactly.
"""

from __future__ import annotations

import io
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from client import ItemRefusedError, RetrievalClient
from testing import server_fixtures
from testing.server_fixtures import ADMIN_KEY, Assets, ServerProcess, make_pki, start_server

# the fixtures this module uses (pytest finds them by name in the module)
server_assets = server_fixtures.server_assets
auth_server = server_fixtures.auth_server

pytestmark = pytest.mark.slow
N_ENROLLED = 60


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


@pytest.fixture(scope="module")
def tenant(auth_server: ServerProcess, server_assets: Assets) -> tuple[str, str]:
    """Tenant "flow" with the first N_ENROLLED glyphs enrolled; returns (name, its key)."""
    with RetrievalClient(auth_server.address, ADMIN_KEY) as admin:
        key = admin.create_tenant("flow")
    with RetrievalClient(auth_server.address, key) as client:
        items = [
            (f"g{i}", server_assets.png(i), str(server_assets.labels[i])) for i in range(N_ENROLLED)
        ]
        results, size = client.enroll_many("flow", items)
    assert all(r.ok for r in results) and size == N_ENROLLED
    return "flow", key


def impostor_query(assets: Assets, threshold: float) -> tuple[int, float]:
    """A non-enrolled image whose best enrolled similarity is below the threshold."""
    sims = assets.embeddings[N_ENROLLED:] @ assets.embeddings[:N_ENROLLED].T
    best = sims.max(axis=1)
    j = int(np.argmax(best < threshold - 1e-4))
    assert best[j] < threshold - 1e-4
    return N_ENROLLED + j, float(best[j])


def test_health_and_reflection(auth_server: ServerProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(auth_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "retrieval.v1.Retrieval"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
    assert {"retrieval.v1.Retrieval", "retrieval.v1.Admin", "grpc.health.v1.Health"} <= names


def test_genuine_accepted_impostor_rejected_top_k(
    auth_server: ServerProcess, server_assets: Assets, tenant
) -> None:
    name, key = tenant
    threshold = server_assets.thresholds[1e-3]
    with RetrievalClient(auth_server.address, key) as client:
        genuine = client.match(name, server_assets.png(7), top_k=5)
        assert genuine.matched and genuine.item_id == "g7"
        assert genuine.similarity == pytest.approx(1.0, abs=1e-5)
        assert genuine.threshold == pytest.approx(threshold, abs=1e-6)
        assert genuine.target_far == 1e-3
        sims = [n.similarity for n in genuine.neighbors]
        assert len(sims) == 5 and sims == sorted(sims, reverse=True)
        expected = np.argsort(
            -(server_assets.embeddings[:N_ENROLLED] @ server_assets.embeddings[7])
        )
        assert [n.item_id for n in genuine.neighbors][:2] == [f"g{i}" for i in expected[:2]]
        j, best = impostor_query(server_assets, threshold)
        impostor = client.match(name, server_assets.png(j))
        assert not impostor.matched
        assert impostor.similarity == pytest.approx(best, abs=1e-4)
        assert impostor.distance == pytest.approx(1 - best, abs=1e-4)


def test_target_far_choice(auth_server: ServerProcess, server_assets: Assets, tenant) -> None:
    name, key = tenant
    with RetrievalClient(auth_server.address, key) as client:
        looser = client.match(name, server_assets.png(1), target_far=1e-2)
        assert looser.threshold == pytest.approx(server_assets.thresholds[1e-2], abs=1e-6)
        assert code_of(lambda: client.match(name, server_assets.png(1), target_far=0.2)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )


def test_batch_and_stream(auth_server: ServerProcess, server_assets: Assets, tenant) -> None:
    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as rpc

    name, key = tenant
    with RetrievalClient(auth_server.address, key) as client:
        out = client.match_batch(name, [server_assets.png(3), b"garbage", server_assets.png(4)])
        assert [o.item_id for o in (out[0], out[2])] == ["g3", "g4"]
        assert isinstance(out[1], ItemRefusedError) and out[1].code == "INVALID_ARGUMENT"
    with grpc.insecure_channel(auth_server.address) as channel:
        stub = rpc.RetrievalStub(channel)
        requests = [pb.MatchRequest(tenant=name, image=server_assets.png(i)) for i in (5, 6, 8)]
        replies = list(stub.MatchStream(iter(requests), metadata=(("x-api-key", key),), timeout=10))
    assert [r.item_id for r in replies] == ["g5", "g6", "g8"]


def test_feedback_and_tenant_stats(auth_server: ServerProcess, server_assets: Assets, tenant):
    name, key = tenant
    with RetrievalClient(auth_server.address, key) as client:
        decision = client.match(name, server_assets.png(9))
        assert client.feedback(name, decision.decision_id, is_same=True) is True
        assert code_of(lambda: client.feedback(name, "0" * 24, True)) == grpc.StatusCode.NOT_FOUND
        info = client.get_tenant(name)
    assert info["gallery_size"] >= N_ENROLLED - 1
    assert info["threshold"] == pytest.approx(server_assets.thresholds[1e-3], abs=1e-6)
    assert info["stats"], "the live monitor reports statistics"
    with RetrievalClient(auth_server.address, ADMIN_KEY) as admin:
        admin.create_tenant("other-fb")
        # a decision of tenant "flow" is not visible through another tenant
        assert code_of(lambda: admin.feedback("other-fb", decision.decision_id, True)) == (
            grpc.StatusCode.NOT_FOUND
        )


def test_remove(auth_server: ServerProcess, server_assets: Assets) -> None:
    with RetrievalClient(auth_server.address, ADMIN_KEY) as client:
        client.create_tenant("rm")
        client.enroll("rm", "a", server_assets.png(0))
        client.enroll("rm", "b", server_assets.png(1))
        reply = client.remove("rm", ["a", "missing"])
        assert (reply.removed, list(reply.not_found), reply.gallery_size) == (1, ["missing"], 1)
        assert client.match("rm", server_assets.png(0)).item_id == "b"
        assert client.delete_tenant("rm") == 1
        assert code_of(lambda: client.get_tenant("rm")) == grpc.StatusCode.NOT_FOUND


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_IMAGES = {
    "corrupt": b"\x89PNG\r\n\x1a\n this is not really a png",
    "truncated": _png(Image.new("L", (32, 32), 200))[:50],
    "too many bytes": b"\x00" * 400_000,
    "too many pixels": _png(Image.new("L", (2000, 2000))),
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_images_are_refused_and_change_nothing(
    auth_server: ServerProcess, server_assets: Assets, kind: str
) -> None:
    with RetrievalClient(auth_server.address, ADMIN_KEY) as client:
        if "bad-img" not in client.list_tenants():
            client.create_tenant("bad-img")
        before = client.get_tenant("bad-img")["gallery_size"]
        data = BAD_IMAGES[kind]
        assert code_of(lambda: client.match("bad-img", data)) == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ItemRefusedError) as err:
            client.enroll("bad-img", f"bad-{kind.replace(' ', '-')}", data)
        assert err.value.code == "INVALID_ARGUMENT"
        assert client.get_tenant("bad-img")["gallery_size"] == before


def test_bad_requests(auth_server: ServerProcess, server_assets: Assets) -> None:
    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as rpc

    image = server_assets.png(0)
    with RetrievalClient(auth_server.address, ADMIN_KEY) as client:
        client.create_tenant("req")
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: client.match("nobody", image)) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: client.enroll_many("req", [])) == invalid
        assert code_of(lambda: client.match_batch("req", [])) == invalid
        assert code_of(lambda: client.remove("req", [])) == invalid
        assert code_of(lambda: client.create_tenant("../etc")) == invalid
        assert code_of(lambda: client.create_tenant("req\n")) == invalid  # issue 12
        assert "req\n" not in client.list_tenants()
        assert code_of(lambda: client.create_tenant("req")) == grpc.StatusCode.ALREADY_EXISTS
        results, size = client.enroll_many(
            "req",
            [("ok", image, ""), ("bad\nid", image, ""), ("trailing\n", image, ""),
             ("labelled", image, "bad\nlabel")],
        )  # fmt: skip
        assert [r.ok for r in results] == [True, False, False, False] and size == 1
        assert {r.error.code for r in results[1:]} == {"INVALID_ARGUMENT"}
        with pytest.raises(ItemRefusedError) as err:
            client.enroll("req", "ok", image)
        assert err.value.code == "ALREADY_EXISTS"
        client.enroll("req", "ok", server_assets.png(1), replace=True)
        assert client.match("req", server_assets.png(1)).matched
        stub = rpc.RetrievalStub(client.channel)
        too_many = pb.MatchBatchRequest(tenant="req", images=[image] * 300)
        assert code_of(lambda: stub.MatchBatch(too_many, metadata=client.metadata)) == invalid


def test_auth(auth_server: ServerProcess, server_assets: Assets) -> None:
    image = server_assets.png(0)
    with RetrievalClient(auth_server.address, ADMIN_KEY) as admin:
        key_a = admin.create_tenant("auth-a")
        admin.create_tenant("auth-b")
        admin.create_tenant("static")  # its key comes from the key file
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    denied = grpc.StatusCode.PERMISSION_DENIED
    with RetrievalClient(auth_server.address) as anonymous:
        assert code_of(lambda: anonymous.match("auth-a", image)) == unauthenticated
    with RetrievalClient(auth_server.address, "wrong-key") as wrong:
        assert code_of(lambda: wrong.match("auth-a", image)) == unauthenticated
    with RetrievalClient(auth_server.address, key_a) as a:
        a.enroll("auth-a", "x", image)
        assert code_of(lambda: a.match("auth-b", image)) == denied
        assert code_of(lambda: a.enroll("auth-b", "x", image)) == denied
        assert code_of(lambda: a.create_tenant("mine")) == denied
        assert code_of(a.reload) == denied
    with RetrievalClient(auth_server.address, "static-key") as static:
        static.enroll("static", "s", image)
        assert code_of(lambda: static.match("auth-a", image)) == denied


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_concurrent_matches_are_micro_batched(
    auth_server: ServerProcess, server_assets: Assets, tenant
) -> None:
    name, key = tenant
    before = _scrape(auth_server.metrics_url)
    with RetrievalClient(auth_server.address, key) as client:

        def one(i: int) -> str:
            return client.match(name, server_assets.png(i % N_ENROLLED)).item_id

        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(one, range(192)))
    assert got == [f"g{i % N_ENROLLED}" for i in range(192)]
    after = _scrape(auth_server.metrics_url)
    images = after["tcm_embed_batch_size_sum"] - before["tcm_embed_batch_size_sum"]
    calls = after["tcm_embed_batch_size_count"] - before["tcm_embed_batch_size_count"]
    assert images == 192
    assert calls < 192, "concurrent requests were not batched"


def test_metrics_contract_names(auth_server: ServerProcess, tenant) -> None:
    names = {n.split("{")[0] for n in _scrape(auth_server.metrics_url)}
    for metric in (
        "tcm_requests_total",
        "tcm_request_duration_seconds_bucket",
        "tcm_stage_duration_seconds_bucket",
        "tcm_embed_batch_size_bucket",
        "tcm_queue_depth",
        "tcm_gallery_items",
        "tcm_decisions_total",
        "tcm_top1_similarity_bucket",
        "tcm_threshold_similarity",
        "tcm_target_far",
        "tcm_model_info",
        "tcm_reloads_total",
        "tcm_inflight_images",
        "tcm_inflight_request_bytes",
        "tcm_overload_rejections_total",
        "tcm_event_loop_lag_seconds",
    ):
        assert metric in names, metric
    text = urllib.request.urlopen(auth_server.metrics_url, timeout=5).read().decode()
    assert 'tcm_gallery_items{tenant="flow"}' in text
    assert 'stage="decode"' in text and 'stage="search"' in text


# ------------------------------------------------- servers of their own
def test_overload_answers_resource_exhausted(server_assets: Assets, tmp_path: Path) -> None:
    server = start_server(
        server_assets, tmp_path, "--no-auth", "--max-queue", "4", "--index", "hnsw"
    )
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("busy")
            client.enroll("busy", "a", server_assets.png(0))
            images = [server_assets.png(i) for i in range(3)]
            # a call larger than the whole queue is refused outright
            assert code_of(lambda: client.match_batch("busy", images * 2)) == exhausted

            def call(_: int) -> str:
                try:
                    client.match_batch("busy", images)
                    return "OK"
                except grpc.RpcError as err:
                    return err.code().name

            codes: list[str] = []
            for _round in range(5):  # a flood: some calls find the queue full
                with ThreadPoolExecutor(32) as pool:
                    codes += list(pool.map(call, range(64)))
                if "RESOURCE_EXHAUSTED" in codes:
                    break
            assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, sorted(set(codes))
            assert client.match("busy", server_assets.png(0)).item_id == "a"  # and recovers
    finally:
        server.stop()


def test_a_flood_of_concurrent_calls_gets_ok_or_resource_exhausted_never_cancelled(
    server_assets: Assets, tmp_path: Path
) -> None:
    """Issue 12: 2,000 concurrent Match calls used to end ~8% CANCELLED by gRPC core's
    pending-call limits; admission control answers RESOURCE_EXHAUSTED with a hint."""
    import asyncio
    from collections import Counter

    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as rpc
    from retrieval.v1.metadata import retry_after_of

    # Tight limits, so 2,000 calls overload the server on any machine and the test sees
    # admission refuse: with merged searches it answers fast enough that 32 images in
    # flight were never all taken, and a loaded client may never get ahead of it.
    server = start_server(
        server_assets, tmp_path, "--no-auth", "--max-queue", "8", "--max-inflight", "4"
    )
    images = [server_assets.png(i) for i in range(20)]

    async def flood() -> tuple[Counter, list]:
        channels = [grpc.aio.insecure_channel(server.address) for _ in range(4)]
        stubs = [rpc.RetrievalStub(c) for c in channels]
        codes: Counter = Counter()
        hints: list = []

        async def one(i: int) -> None:
            request = pb.MatchRequest(tenant="flood", image=images[i % len(images)])
            try:
                await stubs[i % 4].Match(request, timeout=120)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] += 1
                hints.append(retry_after_of(err))

        await asyncio.gather(*(one(i) for i in range(2000)))
        for channel in channels:
            await channel.close()
        return codes, hints

    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("flood")
            client.enroll("flood", "a", server_assets.png(0))
            codes, hints = asyncio.run(flood())
            assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
            assert all(h is not None and 0 < h <= 5 for h in hints)
            assert client.match("flood", server_assets.png(0)).item_id == "a"  # recovered
    finally:
        server.stop()


def test_sigkill_restart_keeps_every_acknowledged_enrolment(
    server_assets: Assets, tmp_path: Path
) -> None:
    import signal

    server = start_server(server_assets, tmp_path, "--no-auth")
    with RetrievalClient(server.address) as client:
        client.create_tenant("durable")
        for i in range(25):
            client.enroll("durable", f"d{i}", server_assets.png(i), label=str(i))
        client.remove("durable", ["d3"])
    server.stop(signal.SIGKILL)  # no chance to snapshot or flush anything more
    again = start_server(server_assets, tmp_path, "--no-auth")
    try:
        with RetrievalClient(again.address) as client:
            assert client.get_tenant("durable")["gallery_size"] == 24
            for i in (0, 7, 24):
                result = client.match("durable", server_assets.png(i))
                assert (result.item_id, result.label) == (f"d{i}", str(i))
        assert again.stop() == 0  # SIGTERM: clean shutdown
    finally:
        again.stop()
    third = start_server(server_assets, tmp_path, "--no-auth")
    try:
        with RetrievalClient(third.address) as client:
            assert client.get_tenant("durable")["gallery_size"] == 24
    finally:
        third.stop()


def test_reload_switches_model_without_dropping_requests(
    server_assets: Assets, tmp_path: Path
) -> None:
    from testing.server_fixtures import make_assets

    other = make_assets(tmp_path / "other", server_assets.images, server_assets.labels, seed=1)
    server = start_server(server_assets, tmp_path / "data", "--no-auth")
    errors: list[BaseException] = []
    stop = threading.Event()
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("re")
            for i in range(20):
                client.enroll("re", f"r{i}", server_assets.png(i))
            same = client.reload()
            assert same.reembedded_items == 0
            refused = code_of(
                lambda: client.reload(str(other.model), str(server_assets.calibration))
            )
            assert refused == grpc.StatusCode.FAILED_PRECONDITION

            def hammer() -> None:
                while not stop.is_set():
                    try:
                        assert client.match("re", server_assets.png(5)).item_id == "r5"
                    except BaseException as err:
                        errors.append(err)

            threads = [threading.Thread(target=hammer) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.2)
            reply = client.reload(str(other.model), str(other.calibration))
            time.sleep(0.2)
            stop.set()
            for t in threads:
                t.join()
            assert reply.reembedded_items == 20
            after = client.match("re", server_assets.png(5))
            assert after.threshold == pytest.approx(other.thresholds[1e-3], abs=1e-6)
            assert after.similarity == pytest.approx(1.0, abs=1e-5)
        assert errors == []
    finally:
        stop.set()
        server.stop()
    restarted = start_server(other, tmp_path / "data", "--no-auth")  # persisted re-embedding
    try:
        with RetrievalClient(restarted.address) as client:
            assert client.match("re", server_assets.png(5)).item_id == "r5"
    finally:
        restarted.stop()


def test_refuses_to_start_on_mismatched_calibration_or_silent_auth(
    server_assets: Assets, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from testing.server_fixtures import ROOT, make_assets

    other = make_assets(tmp_path / "other", server_assets.images[:50], server_assets.labels[:50], 1)
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}", "PATH": "/usr/bin:/bin"}
    base = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0"]

    def start(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *flags],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=False,
        )

    mismatch = start(
        "--no-auth", "--model", str(other.model), "--calibration", str(server_assets.calibration)
    )
    assert mismatch.returncode == 2
    from contracts import sha256_file

    assert sha256_file(other.model) in mismatch.stderr
    assert sha256_file(server_assets.model) in mismatch.stderr
    silent = start(
        "--model", str(server_assets.model), "--calibration", str(server_assets.calibration)
    )
    assert silent.returncode == 2 and "--no-auth" in silent.stderr


def test_client_cli_enroll_and_match(auth_server: ServerProcess, server_assets: Assets, tmp_path):
    import json
    import subprocess
    import sys

    from testing.server_fixtures import ROOT

    for i in range(4):
        folder = tmp_path / "gallery" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.png").write_bytes(server_assets.png(i))
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}", "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> list[dict]:
        out = subprocess.run(
            [sys.executable, "-m", "client", "--address", auth_server.address,
             "--api-key", ADMIN_KEY, *args],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=True,
        )  # fmt: skip
        return [json.loads(line) for line in out.stdout.splitlines()]

    cli("create-tenant", "cli")
    enrolled = cli("enroll", "cli", str(tmp_path / "gallery"))
    assert enrolled[-1] == {"gallery_size": 4, "enrolled": 4, "unchanged": 0, "refused": 0}
    (match,) = cli("match", "cli", str(tmp_path / "gallery" / "class1" / "img3.png"))
    assert match["matched"] and match["item_id"] == "class1/img3.png" and match["label"] == "class1"
    (fb,) = cli("feedback", "cli", match["decision_id"], "same")
    assert fb["matched"] is True
    (stats,) = cli("stats", "cli")
    assert stats["gallery_size"] == 4


def test_reembed_command_and_sighup_reload(server_assets: Assets, tmp_path: Path) -> None:
    import json
    import signal
    import subprocess
    import sys

    from testing.server_fixtures import ROOT, make_assets

    other = make_assets(tmp_path / "other", server_assets.images, server_assets.labels, seed=2)
    data = tmp_path / "data"
    monitoring = ["--monitor-window", "50", "--monitor-window-seconds", "600"]
    monitoring += ["--max-tenant-labels", "3", "--drift-reference", "baseline"]
    server = start_server(server_assets, data, "--no-auth", *monitoring)
    with RetrievalClient(server.address) as client:
        client.create_tenant("offline")
        for i in range(5):
            client.enroll("offline", f"o{i}", server_assets.png(i))
        server.proc.send_signal(signal.SIGHUP)  # reload from the same paths
        deadline = time.monotonic() + 20
        while "reloaded on SIGHUP" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reloaded on SIGHUP" in server.log()
        assert client.match("offline", server_assets.png(2)).item_id == "o2"
        assert "decisions" in client.get_tenant("offline")["stats"]
    assert server.stop() == 0
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.reembed",
            "--data-dir",
            str(data),
            "--model",
            str(other.model),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == {"tenant": "offline", "items": 5, "reembedded": 5}
    restarted = start_server(other, data, "--no-auth")
    try:
        assert "re-embedded" not in restarted.log()
        with RetrievalClient(restarted.address) as client:
            result = client.match("offline", server_assets.png(3))
            assert result.item_id == "o3" and result.similarity == pytest.approx(1.0, abs=1e-5)
    finally:
        restarted.stop()


def test_deadline_exceeded_leaves_the_server_healthy(
    auth_server: ServerProcess, server_assets: Assets, tenant
) -> None:
    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as rpc

    name, key = tenant
    with grpc.insecure_channel(auth_server.address) as channel:
        stub = rpc.RetrievalStub(channel)
        request = pb.MatchBatchRequest(
            tenant=name, images=[server_assets.png(i) for i in range(64)]
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.MatchBatch(request, metadata=(("x-api-key", key),), timeout=0.001)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with RetrievalClient(auth_server.address, key) as client:
        assert client.match(name, server_assets.png(2)).item_id == "g2"


def test_mutual_tls(server_assets: Assets, tmp_path: Path) -> None:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    pki = make_pki(tmp_path / "pki")
    server = start_server(
        server_assets,
        tmp_path / "data",
        "--no-auth",
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-client-ca",
        str(pki / "ca.pem"),
    )
    try:
        with RetrievalClient(
            server.address,
            tls_ca=pki / "ca.pem",
            tls_cert=pki / "client.pem",
            tls_key=pki / "client.key",
            timeout=10,
        ) as client:
            client.create_tenant("tls")
            client.enroll("tls", "t", server_assets.png(0))
            assert client.match("tls", server_assets.png(0)).item_id == "t"
        with RetrievalClient(server.address, tls_ca=pki / "ca.pem", timeout=5) as no_cert:
            assert code_of(no_cert.list_tenants) == grpc.StatusCode.UNAVAILABLE
        with RetrievalClient(server.address, timeout=5) as plaintext:
            assert code_of(plaintext.list_tenants) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_only_decisions_at_the_monitored_target_enter_the_live_far(
    auth_server: ServerProcess, server_assets: Assets
) -> None:
    """Live FAR ratios divide by the server's target FAR: other targets stay out."""
    with RetrievalClient(auth_server.address, ADMIN_KEY) as admin:
        admin.create_tenant("monitored")
        for i in range(8):
            admin.enroll("monitored", f"m{i}", server_assets.png(i))
        at_default = [admin.match("monitored", server_assets.png(i)) for i in range(3)]
        looser = [admin.match("monitored", server_assets.png(i), target_far=1e-2) for i in (4, 5)]
        for d in at_default + looser:
            assert admin.feedback("monitored", d.decision_id, is_same=True) == d.matched
        stats = admin.get_tenant("monitored")["stats"]
    assert stats["decisions"] == 3
    assert stats["genuine_decisions"] == 3


def test_reload_restarts_the_live_windows(server_assets: Assets, tmp_path: Path) -> None:
    from testing.server_fixtures import make_assets

    other = make_assets(tmp_path / "other", server_assets.images, server_assets.labels, seed=1)
    server = start_server(server_assets, tmp_path / "data", "--no-auth")
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("rw")
            for i in range(5):
                client.enroll("rw", f"w{i}", server_assets.png(i))
            for i in range(5):
                client.match("rw", server_assets.png(i))
            client.reload()  # same model and calibration: the windows stay
            assert client.get_tenant("rw")["stats"]["decisions"] == 5
            client.reload(str(other.model), str(other.calibration))
            assert client.get_tenant("rw")["stats"]["decisions"] == 0
            client.match("rw", server_assets.png(1))
            assert client.get_tenant("rw")["stats"]["decisions"] == 1
    finally:
        server.stop()


def test_a_model_that_declares_no_background_is_one_warning(auth_server: ServerProcess) -> None:
    """The test embedder's metadata has no embedder.background and names no known training
    data: served as before (black), and the log says so once, not per image."""
    assert auth_server.log().count("declares no background") == 1, auth_server.log()[-2000:]
