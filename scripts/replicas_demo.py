"""Two server replicas on one Milvus: enrol on one, match on the other, FAR summed by Prometheus.

    .venv/bin/python scripts/replicas_demo.py [--work /tmp/tcm-replicas]

Starts a Milvus 2.3.5 standalone (scripts/milvus_standalone.py), two ``python -m server
--gallery milvus://...`` processes and a real Prometheus scraping both with the
project's rules, runs the client CLI against them and prints a transcript: every
command and its output. Stops everything it started (by PID), also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]


def run(args: list[str], env: dict, keep: int = 0) -> str:
    """Run one CLI command and print it with its output; with ``keep``, a long output
    shows only its first ``keep`` lines and its last one (the count of the rest said)."""
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ {shown}")
    out = subprocess.run(
        [sys.executable, *args[1:]] if args[0] == "python" else args,
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    lines = (out.stdout + out.stderr).strip().splitlines()
    if keep and len(lines) > keep + 1:
        lines = [
            *lines[:keep],
            f"[... {len(lines) - keep - 1} more lines like these ...]",
            lines[-1],
        ]
    print("\n".join(lines))
    return out.stdout


def main() -> int:
    from imagesets import load_images
    from testing.milvus_fixtures import start_milvus
    from testing.prometheus_harness import PrometheusProcess
    from testing.server_fixtures import ServerProcess, png

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/tcm-replicas"))
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "prom").mkdir(parents=True)
    glyphs = load_images("glyphs-tiny", "test")
    gallery, queries = args.work / "gallery", args.work / "queries"
    for n in range(60):  # up to 5 images of each class seen into the gallery, one more to query
        label = str(glyphs.labels[n * 30])
        (gallery / label).mkdir(parents=True, exist_ok=True)
    enrolled = {}
    for i in range(len(glyphs)):
        label = str(glyphs.labels[i])
        folder = gallery / label
        if folder.exists():
            count = len(list(folder.iterdir()))
            if count < 5:
                (folder / f"{i}.png").write_bytes(png(glyphs.pixels[i]))
            elif label not in enrolled:
                queries.mkdir(exist_ok=True)
                (queries / f"{label}.png").write_bytes(png(glyphs.pixels[i]))
                enrolled[label] = i
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'protos'}")
    milvus = servers = None
    try:
        milvus = start_milvus(args.work / "milvus")
        print(f"# Milvus 2.3.5 standalone, pid {milvus.pid}, {milvus.spec}")
        servers = [
            ServerProcess(["--no-auth", "--gallery", milvus.spec, "--data-dir",
                           str(args.work / f"replica-{n}"), "--metrics-port", "0",
                           "--store-refresh-seconds", "1", "--target-far", "0.01",
                           "--log-level", "WARNING"])
            for n in "ab"
        ]  # fmt: skip
        a, b = servers
        print(f"# replica A: {a.ready_line}\n# replica B: {b.ready_line}\n")
        client = ["python", "-m", "client"]
        run([*client, "--address", a.address, "create-tenant", "shop"], env)
        out = run([*client, "--address", a.address, "enroll", "shop", str(gallery)], env, keep=3)
        token = json.loads(out.strip().splitlines()[-1])["write_token"]
        first = sorted(queries.iterdir())[0]
        print("\n# on replica B, at once, with A's write token:")
        out = run([*client, "--address", b.address, "match", "shop", str(first),
                   "--read-after", str(token)], env)  # fmt: skip
        item = json.loads(out.strip().splitlines()[-1])["item_id"]
        print(f"\n# remove the matched item {item} on A, match on B with the removal's token:")
        out = run([*client, "--address", a.address, "remove", "shop", item], env)
        token = json.loads(out.strip().splitlines()[-1])["write_token"]
        run([*client, "--address", b.address, "match", "shop", str(first),
             "--read-after", str(token)], env)  # fmt: skip
        time.sleep(2)
        run([*client, "--address", b.address, "stats", "shop"], env)
        targets = [s.metrics_url.split("//")[1].split("/")[0] for s in servers]
        print(f"\n# Prometheus scraping both replicas ({', '.join(targets)}), the project's rules")
        with PrometheusProcess(args.work / "prom", targets, interval="1s") as prom:
            prom.wait(lambda: len(prom.query("up")) == 2, 30, "both targets")
            time.sleep(2)
            every = sorted(queries.iterdir())
            run([*client, "--address", a.address, "match", "shop", *map(str, every[:8])], env, 2)
            run([*client, "--address", b.address, "match", "shop", *map(str, every[8:])], env, 2)
            time.sleep(5)
            print()
            for expr in (
                'tcm_label_free_exceedances_total{tenant="shop"}',
                'tcm_label_free_pairs_total{tenant="shop"}',
                "sum by (tenant) (tcm_label_free_exceedances_total) "
                "/ sum by (tenant) (tcm_label_free_pairs_total)",
                "tenant_target_far:tcm_label_free_far:ratio1h",
                "tenant_target_far:tcm_label_free_far:target_ratio1h",
                "tenant_target_far:tcm_label_free_far:ci_lower_target_ratio1h",
                "tenant_target_far:tcm_label_free_far:ci_upper_target_ratio1h",
                'sum by (tenant) (tcm_monitored_decisions_total{tenant="shop"})',
            ):
                print(f"promql> {expr}")
                for r in prom.query(expr):
                    keep = ("instance", "tenant", "target_far")
                    labels = {k: v for k, v in r["metric"].items() if k in keep}
                    print(f"  {labels} {r['value'][1]}")
    finally:
        for server in servers or []:
            server.stop()
        if milvus is not None:
            milvus.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
