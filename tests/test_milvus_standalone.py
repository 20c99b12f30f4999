"""scripts/milvus_standalone.py: a second Milvus on the same machine starts too.

The embedded etcd took 127.0.0.1:2380 whatever the configuration said, so a second
standalone (another test session, another replica's dev server) died with -6. Every
port is now chosen free, the etcd peer port included.
"""

from __future__ import annotations

import pytest

from testing.milvus_fixtures import start_milvus

pytestmark = pytest.mark.slow


def test_a_second_standalone_runs_beside_the_first(milvus_server, tmp_path):
    from pymilvus import MilvusClient

    second = start_milvus(tmp_path / "second")
    try:
        assert second.port != milvus_server.port
        for spec in (milvus_server.spec, second.spec):
            client = MilvusClient(spec.replace("milvus://", "http://"))
            assert client.get_server_version()
            client.close()
    finally:
        second.stop()
