"""Shared fixtures: a private glyph cache and tiny models, so tests never touch ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testing.onnx_models import make_linear_embedder


@pytest.fixture(scope="session", autouse=True)
def _glyph_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the rendered glyphs of the test session out of the user's cache.

    Set TCM_TEST_CACHE_DIR to share renders across runs (the test script does).
    """
    shared = os.environ.get("TCM_TEST_CACHE_DIR")
    path = Path(shared) if shared else tmp_path_factory.mktemp("glyph-cache")
    os.environ["TCM_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _progress_switch_stays_in_its_test():
    """A CLI run in process with --no-progress sets TCM_NO_PROGRESS for the process (it is
    meant to reach child processes): undo it, so one test's flag is not the next one's."""
    before = os.environ.get("TCM_NO_PROGRESS")
    yield
    if before is None:
        os.environ.pop("TCM_NO_PROGRESS", None)
    else:
        os.environ["TCM_NO_PROGRESS"] = before


@pytest.fixture(scope="session")
def linear_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_linear_embedder(tmp_path_factory.mktemp("models") / "linear.onnx")


@pytest.fixture(scope="session")
def tiny_glyphs():
    from imagesets import load_images

    return load_images("glyphs-tiny", "test")


# -- skips: fine for a partial install, a failure in the project's own test run -------------
# Tests skip when an optional piece is missing (torch without the train extra, openssl, ...),
# so that `pytest` in a base install still runs what it can. ./test.sh installs every piece
# and sets TCM_TEST_NO_SKIPS=1: there, any skip means a check silently did not run.
_SKIPPED: list[str] = []


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        _SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED and os.environ.get("TCM_TEST_NO_SKIPS") == "1" and exitstatus == 0:
        print("\nTCM_TEST_NO_SKIPS=1 but tests were skipped:\n  " + "\n  ".join(_SKIPPED))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory):
    """A real Milvus 2.3.5 standalone on 127.0.0.1 for the whole session, stopped by PID."""
    from testing.milvus_fixtures import start_milvus

    server = start_milvus(tmp_path_factory.mktemp("milvus"))
    try:
        yield server
    finally:
        server.stop()
