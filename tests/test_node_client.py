"""The Node.js client of docs/SERVER.md, run exactly as the document shows it.

It is cut out of the document (between the ``node-client`` markers), so the snippet a
reader copies is the one tested: against a real server on loopback it must decide bit
for bit like the Python client, be refused ``target_far: 2.0`` (which the loader's
default camelCase option would silently drop), read the empty-gallery reply and print
the retry hint of a rate-limited call. ``scripts/install_node_client.sh`` (run by
./test.sh) installs @grpc/grpc-js and @grpc/proto-loader into .tools/node-client/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from client import RetrievalClient
from testing import server_fixtures
from testing.server_fixtures import ADMIN_KEY, ROOT, Assets, ServerProcess, start_server

server_assets = server_fixtures.server_assets
auth_server = server_fixtures.auth_server
pytestmark = pytest.mark.slow

NODE_MODULES = ROOT / ".tools" / "node-client" / "node_modules"
SNIPPET = re.compile(
    r"<!-- node-client -->\s*```js\n(?P<code>.*?)```\s*<!-- /node-client -->", re.S
)


def snippet() -> str:
    match = SNIPPET.search((ROOT / "docs" / "SERVER.md").read_text())
    assert match, "docs/SERVER.md lost its node-client block"
    return match["code"]


Node = Callable[..., tuple[int, dict]]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    if shutil.which("node") is None or not (NODE_MODULES / "@grpc" / "grpc-js").is_dir():
        pytest.skip("node or its gRPC packages missing: run scripts/install_node_client.sh")
    folder = tmp_path_factory.mktemp("node")

    def run(*args: str, key: str | None = ADMIN_KEY, source: str | None = None):
        script = folder / "match.js"
        script.write_text(source or snippet())
        env = {"PATH": os.environ["PATH"], "NODE_PATH": str(NODE_MODULES)}
        if key:
            env["TCM_API_KEY"] = key
        out = subprocess.run(
            ["node", str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert out.stdout.strip(), out.stderr
        return out.returncode, json.loads(out.stdout)

    return run


@pytest.fixture(scope="module")
def tenant(auth_server: ServerProcess, server_assets: Assets) -> str:
    with RetrievalClient(auth_server.address, ADMIN_KEY) as client:
        client.create_tenant("node")
        items = [(f"n{i}", server_assets.png(i), str(server_assets.labels[i])) for i in range(40)]
        assert all(r.ok for r in client.enroll_many("node", items)[0])
    return "node"


def test_node_decides_bit_identically_to_python(
    node: Node, auth_server: ServerProcess, server_assets: Assets, tenant: str, tmp_path: Path
) -> None:
    with RetrievalClient(auth_server.address, ADMIN_KEY) as client:
        for row, far, top_k in ((0, 0.0, 1), (3, 1e-2, 3), (45, 0.0, 5), (60, 1e-3, 2), (77, 0, 3)):
            image = tmp_path / f"{row}.png"
            image.write_bytes(server_assets.png(row))
            code, got = node(auth_server.address, tenant, str(image), repr(far), str(top_k))
            want = client.match(tenant, image.read_bytes(), top_k, far)
            assert code == 0, got
            for key in ("matched", "item_id", "label", "similarity", "distance", "score"):
                assert got[key] == getattr(want, key), key
            for key in ("threshold", "raw_threshold", "target_far", "normalization"):
                assert got[key] == getattr(want, key), key
            assert got["gallery_size"] == "40" and want.gallery_size == 40  # longs: String
            assert [(n["item_id"], n["similarity"], n["score"]) for n in got["neighbors"]] == [
                (n.item_id, n.similarity, n.score) for n in want.neighbors
            ]
            assert len(got["neighbors"]) == top_k


def test_snake_case_fields_are_refused_not_dropped(
    node: Node, auth_server: ServerProcess, server_assets: Assets, tenant: str, tmp_path: Path
) -> None:
    image = tmp_path / "q.png"
    image.write_bytes(server_assets.png(1))
    code, got = node(auth_server.address, tenant, str(image), "2.0", "3")
    assert code == 1 and got["code"] == "INVALID_ARGUMENT", got
    assert "must lie in (0, 1)" in got["error"] and got["retry_after_s"] is None
    # Why keepCase matters: with proto-loader's default, target_far and top_k vanish and
    # the same request is served at the default FAR with one neighbour.
    camel = snippet().replace("keepCase: true", "keepCase: false")
    code, got = node(auth_server.address, tenant, str(image), "2.0", "3", source=camel)
    assert code == 0 and got["targetFar"] == 0.001 and len(got["neighbors"]) == 1


def test_empty_gallery_and_the_retry_hint(
    node: Node, server_assets: Assets, tmp_path: Path
) -> None:
    """One image per 100 s and a bucket of one: the second call is RESOURCE_EXHAUSTED and
    the snippet prints the server's hint."""
    server = start_server(
        server_assets, tmp_path / "data", "--no-auth", "--tenant-rate", "0.01",
        "--tenant-burst", "1",
    )  # fmt: skip
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("slow")
        image = tmp_path / "q.png"
        image.write_bytes(server_assets.png(0))
        code, first = node(server.address, "slow", str(image), key=None)
        assert code == 0 and first["matched"] is False and first["neighbors"] == []
        assert first["no_match_reason"] == "the gallery is empty" and first["gallery_size"] == "0"
        assert "similarity" not in first and "distance" not in first  # absent, not 0
        code, second = node(server.address, "slow", str(image), key=None)
        assert code == 1 and second["code"] == "RESOURCE_EXHAUSTED", second
        assert 0 < second["retry_after_s"] <= 100, second
    finally:
        server.stop()
