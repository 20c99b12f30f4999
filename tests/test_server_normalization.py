"""Score normalisation in the served path: a real server, a real normalised calibration.

The calibration is made by ``python -m calibrate`` (tenant-tail, with the global tail)
for the tiny linear model on glyph images; the server starts from it, so Match maps
every tenant's scores through that tenant's own tail statistics.
"""

from __future__ import annotations

import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from calibrate.cli.main import main as calibrate_main
from client import RetrievalClient
from testing import server_fixtures
from testing.server_fixtures import Assets, ServerProcess, start_server

server_assets = server_fixtures.server_assets
normalised = server_fixtures.normalised_assets


def serve(assets: Assets, data_dir: Path, *extra: str) -> ServerProcess:
    return start_server(assets, data_dir, "--no-auth", "--target-far", "0.01", *extra)


def enroll(client: RetrievalClient, tenant: str, assets: Assets, rows: range) -> None:
    items = [(f"{tenant}-{i}", assets.png(i), str(assets.labels[i])) for i in rows]
    for start in range(0, len(items), 100):
        results, _ = client.enroll_many(tenant, items[start : start + 100])
        assert all(r.ok for r in results)


def test_cold_start_runs_the_identity_then_the_map_activates(normalised, tmp_path):
    server = serve(normalised, tmp_path)
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("shop")
            enroll(client, "shop", normalised, range(10))
            info = client.get_tenant("shop")
            assert info["normalization"] == "tenant-tail"
            assert not info["normalization_active"]  # 10 items: far too few pairs
            assert info["tail_pairs"] < info["normalization_min_pairs"]
            r = client.match("shop", normalised.png(300))
            assert not r.normalization_active
            assert r.score == pytest.approx(r.similarity)  # the identity map
            assert r.raw_threshold == pytest.approx(r.threshold)

            enroll(client, "shop", normalised, range(10, 260))
            info = client.get_tenant("shop")
            assert info["normalization_active"]
            assert info["tail_pairs"] >= info["normalization_min_pairs"]
            r = client.match("shop", normalised.png(300), top_k=5)
            assert r.normalization == "tenant-tail" and r.normalization_active
            assert r.raw_threshold != pytest.approx(r.threshold)
            # the decision is on the normalised score, and equals the raw one at the
            # tenant's raw threshold; neighbours keep their order on both scales
            assert r.matched == (r.score >= r.threshold)
            assert r.matched == (r.similarity >= r.raw_threshold)
            sims = [n.similarity for n in r.neighbors]
            scores = [n.score for n in r.neighbors]
            assert np.all(np.diff(sims) <= 0) and np.all(np.diff(scores) <= 0)
            assert info["raw_threshold"] == pytest.approx(r.raw_threshold, abs=2e-3)
    finally:
        server.stop()


def test_unlabelled_traffic_counts_for_a_small_tenant(normalised, tmp_path):
    """30 identities are 435 pairs, far from the 1,500 a map needs; a few hundred
    unlabelled queries bring it there, once the traffic is synced (--sync-seconds)."""
    server = serve(normalised, tmp_path, "--sync-seconds", "0.2")
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("new")
            enroll(client, "new", normalised, range(30))
            before = client.get_tenant("new")
            assert not before["normalization_active"] and before["traffic_queries"] == 0
            queries = [normalised.png(i) for i in range(30, 230)]
            for start in range(0, len(queries), 50):
                client.match_batch("new", queries[start : start + 50])
            after = wait_for(
                lambda: client.get_tenant("new"), lambda i: i["traffic_queries"] >= 200
            )
            assert after["traffic_queries"] == 200  # every replica's, as synced: one here
            assert after["tail_pairs"] > before["tail_pairs"]  # the traffic is evidence
            assert after["normalization_active"]
            assert 0.0 <= after["traffic_genuine_share"] <= 1.0
    finally:
        server.stop()


def test_enrolling_the_same_images_twice_moves_the_threshold_less_than_a_bin(normalised, tmp_path):
    """The same pictures under new ids (and no labels) are not 140 new impostors each:
    the pairs of one picture with itself are set aside, and GetTenant says how many."""
    server = serve(normalised, tmp_path)
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("dup")
            items = [(f"a{i}", normalised.png(i), "") for i in range(140)]
            assert all(r.ok for r in client.enroll_many("dup", items)[0])
            once = client.get_tenant("dup")
            again = [(f"b{i}", normalised.png(i), "") for i in range(140)]
            assert all(r.ok for r in client.enroll_many("dup", again)[0])
            twice = client.get_tenant("dup")
            assert twice["duplicate_pairs"] == 140 and once["duplicate_pairs"] == 0
            assert twice["normalization_active"] and once["normalization_active"]
            assert abs(twice["raw_threshold"] - once["raw_threshold"]) < 2 / 4096  # one bin
    finally:
        server.stop()


def wait_for(read, done, seconds: float = 10.0):
    """``read()`` until ``done(value)``: the statistics sync runs in the background."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def metric(url: str, name: str, tenant: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{tenant="{tenant}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {tenant} not exported")


def test_statistics_survive_sigkill_and_are_exported(normalised, tmp_path):
    server = serve(normalised, tmp_path)
    with RetrievalClient(server.address) as client:
        client.create_tenant("durable")
        enroll(client, "durable", normalised, range(0, 300))
        client.remove("durable", [f"durable-{i}" for i in range(0, 300, 7)])
        before = client.get_tenant("durable")
    assert metric(server.metrics_url, "tcm_norm_active", "durable") == 1
    assert before["tail_pairs"] > 0  # in GetTenant; not a per-tenant series since issue 21
    shift = metric(server.metrics_url, "tcm_norm_threshold_shift", "durable")
    assert shift == pytest.approx(before["raw_threshold"] - before["threshold"], abs=1e-5)
    server.stop(signal.SIGKILL)
    again = serve(normalised, tmp_path)
    try:
        with RetrievalClient(again.address) as client:
            after = client.get_tenant("durable")
        assert after["tail_pairs"] == before["tail_pairs"]
        assert after["raw_threshold"] == pytest.approx(before["raw_threshold"], abs=1e-7)
    finally:
        again.stop()


def test_normalize_none_serves_raw_scores(normalised, tmp_path):
    server = serve(normalised, tmp_path, "--normalize", "none")
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("raw")
            enroll(client, "raw", normalised, range(200))
            r = client.match("raw", normalised.png(300))
            assert r.normalization == "none" and r.score == pytest.approx(r.similarity)
            assert r.raw_threshold == pytest.approx(r.threshold)
    finally:
        server.stop()


def test_a_document_without_the_tail_refuses_the_normalised_mode(server_assets, tmp_path):
    """server_assets' calibration is schema 1: raw serving works, tenant-tail is refused."""
    with pytest.raises(RuntimeError, match="python -m calibrate --normalize tenant-tail"):
        files = [
            "--model",
            str(server_assets.model),
            "--calibration",
            str(server_assets.calibration),
        ]
        ServerProcess(
            [*files, "--data-dir", str(tmp_path), "--no-auth", "--normalize", "tenant-tail"]
        )
    assert not (Path(tmp_path) / "tenants").exists()


def test_an_unknown_or_offline_mode_is_a_usage_error(normalised, tmp_path):
    for mode in ("zscore", "as-norm"):
        with pytest.raises(RuntimeError, match="--normalize"):
            serve(normalised, tmp_path, "--normalize", mode)


def test_reload_recomputes_the_statistics_for_the_new_model(normalised, tmp_path):
    from testing.onnx_models import make_linear_embedder

    other = make_linear_embedder(tmp_path / "other.onnx", seed=1)
    calibration = tmp_path / "other-cal" / "calibration.json"
    data = ["--model", str(other), "--dataset", "glyphs-tiny", "--out", str(calibration)]
    assert calibrate_main([*data, "--target-far", "0.01,0.05", "--no-progress"]) == 0
    server = serve(normalised, tmp_path / "data")
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("shop")
            enroll(client, "shop", normalised, range(250))
            before = client.get_tenant("shop")
            client.reload(str(other), str(calibration))
            after = client.get_tenant("shop")
            r = client.match("shop", normalised.png(300))
        assert before["normalization_active"] and after["normalization_active"]
        assert after["tail_pairs"] == before["tail_pairs"]  # same items, same identities
        assert after["raw_threshold"] != pytest.approx(before["raw_threshold"], abs=1e-6)
        assert after["threshold"] != pytest.approx(before["threshold"], abs=1e-6)
        assert r.raw_threshold == pytest.approx(after["raw_threshold"], abs=2e-3)
    finally:
        server.stop()


def test_normalisation_is_the_same_on_the_faiss_and_milvus_backends(normalised, tmp_path):
    """The tail statistics are a function of the item set, so a tenant served from Milvus
    gets the same map, raw threshold and scores as from the in-process store."""
    servers = {
        "faiss": serve(normalised, tmp_path / "faiss"),
        "milvus-lite": serve(
            normalised, tmp_path / "lite", "--gallery", f"milvus-lite:{tmp_path / 'g.db'}"
        ),
    }
    try:
        seen = {}
        for name, server in servers.items():
            with RetrievalClient(server.address) as client:
                client.create_tenant("shop")
                enroll(client, "shop", normalised, range(260))
                info = client.get_tenant("shop")
                r = client.match("shop", normalised.png(300), top_k=3)
                seen[name] = (info, r)
        (fi, fr), (mi, mr) = seen["faiss"], seen["milvus-lite"]
        assert fi["normalization_active"] and mi["normalization_active"]
        assert fi["tail_pairs"] == mi["tail_pairs"]
        assert fi["raw_threshold"] == pytest.approx(mi["raw_threshold"], abs=1e-9)
        assert [n.item_id for n in fr.neighbors] == [n.item_id for n in mr.neighbors]
        assert fr.score == pytest.approx(mr.score, abs=1e-5)
        assert fr.matched == mr.matched
    finally:
        for server in servers.values():
            server.stop()
