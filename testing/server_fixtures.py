"""A real server on loopback for tests and benchmarks: tiny ONNX model + its calibration.

The model is testing.onnx_models.make_linear_embedder; the calibration document is
measured here on glyph images with the exact order statistic of DESIGN.md, so the
server's threshold means what it says for this model. The server runs as
``python -m server`` in a subprocess, exactly as an operator starts it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contracts import save_calibration, sha256_file
from testing.onnx_models import make_linear_embedder

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "admin-secret-key"
FARS = (1e-3, 1e-2)
# small limits so the tests can exceed them cheaply
LIMIT_FLAGS = (
    "--max-image-bytes",
    "300000",
    "--max-image-pixels",
    "1000000",
    "--max-delay-ms",
    "5",
)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def threshold_for(impostor_scores: np.ndarray, far: float) -> tuple[float, int]:
    """Smallest similarity accepting at most floor(far * M) impostor pairs (ties included)."""
    scores = np.sort(impostor_scores.astype(np.float32))[::-1]
    k = int(np.floor(far * len(scores)))
    t = float(np.nextafter(scores[k], np.float32(np.inf)))  # rejects scores[k] and below
    return t, k


def write_calibration(
    model: Path, embeddings: np.ndarray, labels: np.ndarray, path: Path, fars=FARS
) -> Path:
    """A schema-valid calibration of ``model`` measured on (embeddings, labels)."""
    sims = embeddings @ embeddings.T
    upper = np.triu_indices(len(labels), 1)
    same = labels[upper[0]] == labels[upper[1]]
    impostor, genuine = sims[upper][~same], sims[upper][same]
    targets = []
    for far in fars:
        t, k = threshold_for(impostor, far)
        accepted = int((impostor >= t).sum())
        targets.append(
            {
                "target_far": far,
                "measurable": True,
                "k": k,
                "impostor_pairs": len(impostor),
                "genuine_pairs": len(genuine),
                "threshold": {"similarity": t, "distance": 1 - t},
                "accepted_impostors": accepted,
                "achieved_far": accepted / len(impostor),
                "tar": float((genuine >= t).mean()),
                "frr": float((genuine < t).mean()),
                "warnings": [],
                "datasets": [],
            }
        )
    top1 = np.sort(sims - 2 * np.eye(len(sims)), axis=1)[:, -1]
    edges = np.linspace(-1, 1, 41)
    doc = {
        "schema": "tcm-retrieval.calibration",
        "schema_version": 1,
        "created_at": "2026-11-25T00:00:00Z",
        "model": {"sha256": sha256_file(model), "file": model.name, "embedding_dim": 16},
        "settings": {
            "far_range": [1e-4, 1e-2],
            "grid_size": 101,
            "beta": 1.0,
            "eps": 0.05,
            "bootstrap": 0,
        },
        "datasets": [
            {
                "name": "glyphs-tiny",
                "images": len(labels),
                "classes": len(set(labels.tolist())),
                "excluded_classes": 0,
                "genuine_pairs": len(genuine),
                "impostor_pairs": len(impostor),
            }
        ],
        "targets": targets,
        "reference": {
            "top1_similarity": {
                "edges": edges.tolist(),
                "counts": {"glyphs-tiny": np.histogram(top1, edges)[0].tolist()},
            }
        },
    }
    save_calibration(doc, path)
    return path


@dataclass
class Assets:
    """Model, calibration, and glyph images (with their embeddings) for server tests."""

    model: Path
    calibration: Path
    keys: Path
    images: np.ndarray  # (N, 32, 32) uint8
    labels: np.ndarray
    embeddings: np.ndarray
    thresholds: dict[float, float]

    def png(self, i: int) -> bytes:
        return png(self.images[i])


def make_assets(directory: Path, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> Assets:
    from embedding import OnnxEmbedder

    directory.mkdir(parents=True, exist_ok=True)
    model = make_linear_embedder(directory / f"linear{seed}.onnx", seed=seed)
    embeddings = OnnxEmbedder(model, device="cpu").embed(images)
    calibration = write_calibration(model, embeddings, labels, directory / f"linear{seed}.json")
    keys = directory / "keys.json"
    keys.write_text(json.dumps({"admin": [ADMIN_KEY], "tenants": {"static": ["static-key"]}}))
    from contracts import load_calibration

    doc = load_calibration(calibration)
    return Assets(
        model,
        calibration,
        keys,
        images,
        labels,
        embeddings,
        {t.target_far: t.threshold for t in doc.targets()},
    )


class ServerProcess:
    """``python -m server`` in a subprocess; ``address`` once ready."""

    def __init__(self, args: list[str], root: Path = ROOT) -> None:
        """``root``: the source tree to run (another checkout, e.g. a benchmark's baseline)."""
        env = dict(os.environ, PYTHONPATH=f"{root}:{root / 'protos'}", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", *args],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.ready_line = self._wait_ready()
        # "serving retrieval.v1 on HOST:PORT, metrics on http://HOST:MPORT/metrics"; with
        # --workers N: "... metrics on URL1 URL2 (N workers)", one endpoint per worker
        self.address = self.ready_line.split(" on ")[1].split(",")[0]
        self.metrics_urls = self.ready_line.split("metrics on ")[1].split(" (")[0].split()
        self.metrics_url = self.metrics_urls[0]

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _wait_ready(self, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("serving retrieval.v1 on "):
                return line.strip()
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(self.stderr[-30:]))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        return "".join(self.stderr)

    def per_worker(self, name: str, method: str) -> list[float]:
        """The samples ``name`` with ``method=method``, summed per worker's endpoint."""
        from prometheus_client.parser import text_string_to_metric_families

        out = []
        for url in self.metrics_urls:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            families = text_string_to_metric_families(text)
            samples = [s for f in families for s in f.samples if s.name == name]
            out.append(sum(s.value for s in samples if s.labels.get("method") == method))
        return out


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(directory: Path, ca: str = "test-ca") -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
        _openssl("x509", "-req", "-in", f"{name}.csr", *sign, "-out", f"{name}.pem", *ext,
                 cwd=directory)  # fmt: skip
    return directory


@pytest.fixture(scope="session")
def server_assets(tmp_path_factory: pytest.TempPathFactory, tiny_glyphs) -> Assets:
    """400 glyph images (seeded choice) with a model and calibration measured on them."""
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(tiny_glyphs), 400, replace=False))
    return make_assets(
        tmp_path_factory.mktemp("server-assets"),
        tiny_glyphs.pixels[pick],
        np.asarray(tiny_glyphs.labels)[pick],
    )


@pytest.fixture(scope="session")
def normalised_assets(server_assets: Assets, tmp_path_factory) -> Assets:
    """server_assets with a calibration made by the calibrate CLI (tenant-tail)."""
    from calibrate.cli.main import main as calibrate_main
    from contracts import load_calibration

    out = tmp_path_factory.mktemp("norm-cal") / "calibration.json"
    data = ["--model", str(server_assets.model), "--dataset", "glyphs-tiny"]
    code = calibrate_main([*data, "--target-far", "0.01,0.05", "--out", str(out), "--no-progress"])
    assert code == 0
    doc = load_calibration(out)
    assert doc.normalization().method == "tenant-tail"
    return Assets(
        server_assets.model,
        out,
        server_assets.keys,
        server_assets.images,
        server_assets.labels,
        server_assets.embeddings,
        {t.target_far: t.threshold for t in doc.targets()},
    )


def start_server(assets: Assets, data_dir: Path, *extra: str) -> ServerProcess:
    return ServerProcess(
        [
            "--model",
            str(assets.model),
            "--calibration",
            str(assets.calibration),
            "--data-dir",
            str(data_dir),
            "--device",
            "cpu",
            *extra,
        ]
    )


@pytest.fixture(scope="session")
def auth_server(server_assets: Assets, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server with API keys (admin key ADMIN_KEY), shared by the tests of a session."""
    server = start_server(
        server_assets,
        tmp_path_factory.mktemp("server-data"),
        "--api-keys",
        str(server_assets.keys),
        *LIMIT_FLAGS,
    )
    yield server
    server.stop()
