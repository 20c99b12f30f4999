"""A live server against the malformed-image corpus and requests with fields at edge values.

The fixed-seed CI subset of ``python -m reliability.fuzz`` (docs/RELIABILITY.md): a
stratified sample of the corpus through Match, MatchBatch, Enroll and MatchStream,
and hypothesis-drawn requests of every RPC, then the invariants: no gallery changed
except by acknowledged enrolments, no file outside the data directory. Every answer
must be a status the RPC may give (never UNKNOWN or INTERNAL) and agree with the
in-process decoder.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability.corpus import Sample, build
from reliability.fuzz import ServerFuzzer, Tally, raw_messages, requests, run_examples
from server.matching.imaging import ImageLimits
from testing import server_fixtures
from testing.server_fixtures import ADMIN_KEY, LIMIT_FLAGS, Assets, start_server

server_assets = server_fixtures.server_assets
pytestmark = pytest.mark.slow
LIMITS = ImageLimits(max_bytes=300_000, max_pixels=1_000_000)  # = LIMIT_FLAGS


@pytest.fixture(scope="module")
def fuzz(server_assets: Assets, tmp_path_factory) -> Iterator[tuple[ServerFuzzer, Path]]:
    sandbox = tmp_path_factory.mktemp("fuzz-sandbox")
    server = start_server(
        server_assets, sandbox / "data", "--api-keys", str(server_assets.keys), *LIMIT_FLAGS
    )
    glyphs = [server_assets.png(i) for i in range(40)]
    fuzzer = ServerFuzzer(
        server.address, ADMIN_KEY, glyphs, sandbox / "data", LIMITS, Tally(),
        reload_paths=(str(server_assets.model), str(server_assets.calibration)),
    )  # fmt: skip
    fuzzer.setup()
    yield fuzzer, sandbox
    fuzzer.close()
    assert server.stop() == 0
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.fixture(scope="module")
def sample() -> list[Sample]:
    """Every seed and bomb, the issue's TIFF, and a seeded draw of the rest."""
    corpus = build(seed=0)
    always = [s for s in corpus if s.kind in ("seed", "bomb") or s.name == "TIFF-L/tag273-type=2"]
    rest = [s for s in corpus if s not in always]
    return always + random.Random(0).sample(rest, 200)


def test_corpus_through_every_image_rpc(fuzz, sample) -> None:
    fuzzer, sandbox = fuzz
    for s in sample:
        fuzzer.match(s)
        fuzzer.batch(s)
        fuzzer.enroll(s)
    for start in range(0, len(sample), 4):
        fuzzer.stream(sample[start : start + 4])
    fuzzer.check_invariants(sandbox)
    assert fuzzer.tally.failures == []
    counts = fuzzer.tally.by_status()
    assert set(counts["server/Match"]) == {"OK", "INVALID_ARGUMENT"}  # both seen
    assert fuzzer.scratch  # some malformed-but-decodable files were enrolled


def test_request_fields_at_edge_values(fuzz, server_assets: Assets) -> None:
    fuzzer, sandbox = fuzz
    images = [*fuzzer.glyphs[:3], b"", b"GIF89a", server_assets.png(0)[:40]]
    reload_paths = (str(server_assets.model), str(server_assets.calibration))
    run_examples(requests(images, reload_paths), fuzzer.request, examples=250, seed=0)
    run_examples(raw_messages(), lambda m: fuzzer.raw(*m), examples=150, seed=0)
    fuzzer.check_invariants(sandbox)
    assert fuzzer.tally.failures == []
    statuses = {status for (what, status) in fuzzer.tally.counts if what.startswith("fields/")}
    assert {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND"} <= statuses
