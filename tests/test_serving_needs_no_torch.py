"""The serving side (calibrate, server, client) must import with torch absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'pytorch_metric_learning', 'train'):\n"
    "            raise ImportError('blocked: ' + name)\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_calibrate_and_server_import_without_torch():
    code = BLOCK + (
        "import contracts, imagesets, embedding, calibrate, server, client\n"
        "import calibrate.__main__, calibrate.engine.evaluate, calibrate.heldout.serving\n"
        "import calibrate.reports.outputs, calibrate.cli.check\n"
        "import calibrate.studies.leave_tenant_out\n"
        "import server.__main__, server.api.app, server.api.keys, server.reembed\n"
        "import server.matching.service, server.monitoring, server.monitoring.serving\n"
        "import server.storage.faiss, server.storage.milvus, client.__main__\n"
        "import demo.__main__, demo.pipeline\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded & {'torch', 'train'}, sorted(loaded)\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
