"""The serving side (calibrate, server) must import with torch absent."""

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
        "import contracts, imagesets, embedding, calibrate, server\n"
        "import calibrate.__main__, server.__main__, server.api.app, client, server.monitoring\n"
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
