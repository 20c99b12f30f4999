"""The shipped default embedder behind the real server: genuine accepted, impostors rejected.

Skipped when the default model or its calibration is absent or they do not belong
together (e.g. mid-way through replacing the model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client import RetrievalClient
from testing.server_fixtures import ServerProcess, png

pytestmark = pytest.mark.slow
CLASSES = 20


@pytest.fixture(scope="module")
def default_server(tmp_path_factory) -> ServerProcess:
    from contracts import CalibrationError, load_calibration
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL

    # The shipped pair is what the demo and a new user serve: a missing file or a
    # calibration of another model is the regression this test is here to catch.
    assert DEFAULT_MODEL.exists(), f"{DEFAULT_MODEL} missing; make it with the train CLI"
    assert DEFAULT_CALIBRATION.exists(), f"{DEFAULT_CALIBRATION} missing: run python -m calibrate"
    try:
        load_calibration(DEFAULT_CALIBRATION).check_model(DEFAULT_MODEL)
    except CalibrationError as err:
        pytest.fail(f"the shipped calibration does not match the shipped model: {err}")
    data: Path = tmp_path_factory.mktemp("default-server")
    server = ServerProcess(["--no-auth", "--data-dir", str(data), "--device", "cpu"])
    yield server
    server.stop()


def test_default_model_accepts_genuine_and_rejects_impostors(default_server, tiny_glyphs):
    labels = np.asarray(tiny_glyphs.labels)
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= 4]
    enrolled, others = classes[:CLASSES], classes[CLASSES : 2 * CLASSES]
    with RetrievalClient(default_server.address) as client:
        client.create_tenant("glyphs")
        items = []
        for c in enrolled:
            i = int(np.flatnonzero(labels == c)[0])
            items.append((f"c{c}", png(tiny_glyphs.image(i)), str(c)))
        results, size = client.enroll_many("glyphs", items)
        assert all(r.ok for r in results) and size == CLASSES
        same = client.match("glyphs", items[0][1])
        assert same.matched and same.similarity == pytest.approx(1.0, abs=1e-4)
        genuine = [
            client.match("glyphs", png(tiny_glyphs.image(int(i))))
            for c in enrolled
            for i in np.flatnonzero(labels == c)[1:3]
        ]
        impostor = [
            client.match("glyphs", png(tiny_glyphs.image(int(np.flatnonzero(labels == c)[0]))))
            for c in others
        ]
    genuine_rate = np.mean([g.matched for g in genuine])
    impostor_rate = np.mean([m.matched for m in impostor])
    correct = np.mean(
        [g.item_id == f"c{c}" for g, c in zip(genuine, np.repeat(enrolled, 2), strict=True)]
    )
    print(
        f"genuine accepted {genuine_rate:.2f}, impostors accepted {impostor_rate:.2f}, "
        f"top-1 correct {correct:.2f}"
    )
    assert genuine_rate >= 0.5, genuine_rate
    # lookalike glyphs across scripts (Latin A, Greek Alpha, Cyrillic A) are impostors too
    assert impostor_rate <= 0.25, impostor_rate
    assert genuine_rate - impostor_rate >= 0.4
    assert correct >= 0.8, correct


def test_transparent_pngs_match_like_their_opaque_twins(default_server, tiny_glyphs):
    """Through the real server and the shipped model: a transparent PNG of a glyph (ink
    opacity = darkness) gets the same embedding and the same top-1 as the opaque PNG.
    Composited onto black, as before the model's background was read, 1/30 queries found
    their class; here every query must give the same answer both ways."""
    from tests.test_background import transparent_twin

    labels = np.asarray(tiny_glyphs.labels)
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= 3][:CLASSES]
    with RetrievalClient(default_server.address) as client:
        client.create_tenant("clear")
        rows = [int(np.flatnonzero(labels == c)[0]) for c in classes]
        items = [
            (f"c{c}", png(tiny_glyphs.image(r)), str(c)) for c, r in zip(classes, rows, strict=True)
        ]
        assert all(r.ok for r in client.enroll_many("clear", items)[0])
        # the enrolled image itself, sent transparent: the same embedding (similarity 1)
        for (item_id, _, _), row in zip(items, rows, strict=True):
            same = client.match("clear", transparent_twin(tiny_glyphs.image(row)))
            assert same.item_id == item_id and same.similarity == pytest.approx(1.0, abs=1e-5)
        queries = [int(np.flatnonzero(labels == c)[1]) for c in classes]
        for row in queries:
            want = client.match("clear", png(tiny_glyphs.image(row)), top_k=3)
            got = client.match("clear", transparent_twin(tiny_glyphs.image(row)), top_k=3)
            assert (got.item_id, got.matched) == (want.item_id, want.matched)
            assert got.similarity == want.similarity  # bit-identical pixels, same embedding
            assert [n.item_id for n in got.neighbors] == [n.item_id for n in want.neighbors]
