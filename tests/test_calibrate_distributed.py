"""calibrate.evaluate(distributed=True) on 2 gloo CPU processes equals one process, bit for bit.

Each rank sweeps every other score block; after each pass the ranks sum their counts,
take the max of their best impostors and merge their resolved tail bins. The whole
Evaluation (thresholds, counts, per-class and per-dataset OPIS, bootstrap intervals)
and the calibration document must equal the single-process ones exactly, with the
tail cache (passes 2 and 3 read each rank's cached tail pairs) and without it (they
sweep the blocks again).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibrate import evaluate
from calibrate.cli.main import EXIT_BAD_INPUT, main
from demo.processes import free_port
from tests.test_calibrate import make_set, tied_set

ROOT = Path(__file__).resolve().parents[1]

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

WORLD = 2


def _cases():
    """(name, embeddings, evaluate kwargs, tail-cache budget or None for the default)."""
    rand = make_set(n=500, seed=6)
    tied = tied_set(n=300, seed=1)
    two = [make_set(n=260, classes=30, tenants=1, dim=4, seed=3), tied_set(n=200, seed=4)]
    deep = make_set(n=600, classes=60, seed=8)
    fars = (0.001, 0.05)
    return [
        ("random-cached", rand, dict(target_fars=fars, bootstrap=20, block=64), None),
        ("random-streamed", rand, dict(target_fars=fars, bootstrap=20, block=64), 0),
        ("tied-cached", tied, dict(target_fars=(0.01, 0.1), block=37), None),
        ("tied-streamed", tied, dict(target_fars=(0.01, 0.1), block=37), 0),
        ("two-sets", two, dict(target_fars=fars, bootstrap=10, block=50), None),
        # a high sampled cutoff: ~350 rows have no impostor in the tail, found in chunks
        ("high-cutoff", deep, dict(target_fars=(0.001,), far_range=(1e-4, 2e-3), block=32), 0),
    ]


def _run(case, distributed: bool):
    from calibrate.engine import passes

    _, es, kwargs, budget = case
    saved = passes.CACHE_BYTES
    if budget is not None:
        passes.CACHE_BYTES = budget
    try:
        ev = evaluate(es, distributed=distributed, **kwargs)
    finally:
        passes.CACHE_BYTES = saved
    doc = ev.to_document("0" * 64)
    doc.pop("created_at")
    return ev, doc


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        results = [_run(case, distributed=True) for case in _cases()]
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))


def _same(a, b, path: str = "") -> None:
    """Exact equality of nested results (NaN equals NaN, -0.0 equals 0.0 only as floats)."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, path
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), path
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_two_gloo_processes_equal_one_bit_for_bit(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    want = [_run(case, distributed=False) for case in _cases()]
    for rank in range(WORLD):
        got = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        for case, (w_ev, w_doc), (g_ev, g_doc) in zip(_cases(), want, got, strict=True):
            assert g_doc == w_doc, (case[0], rank)
            _same(g_ev, w_ev, f"{case[0]}/rank{rank}")


def test_distributed_without_a_process_group_says_what_to_do() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already running")
    with pytest.raises(RuntimeError, match="torchrun"):
        evaluate(make_set(n=100), distributed=True)


@pytest.mark.slow
def test_torchrun_cli_writes_the_single_process_document(linear_model, tmp_path: Path) -> None:
    from tests.test_calibrate_cli import write_npz

    data = [write_npz(tmp_path / "a.npz", n=300, seed=1), write_npz(tmp_path / "b.npz", seed=2)]
    common = ["--model", str(linear_model), "--target-far", "0.01", "--block", "40"]
    common += ["--bootstrap", "10", "--no-progress"]
    for d in data:
        common += ["--dataset", str(d)]
    torchrun = Path(sys.executable).with_name("torchrun")
    dist_out, one_out = tmp_path / "dist" / "c.json", tmp_path / "one" / "c.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(WORLD), "-m", "calibrate"]
    got = subprocess.run(
        [*cmd, "--distributed", *common, "--out", str(dist_out)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert got.returncode == 0, got.stderr
    assert main([*common, "--out", str(one_out)]) == 0
    assert got.stdout.count("wrote ") == 1  # only rank 0 prints and writes
    want_doc, got_doc = json.loads(one_out.read_text()), json.loads(dist_out.read_text())
    want_doc.pop("created_at"), got_doc.pop("created_at")
    assert got_doc == want_doc


def test_cli_distributed_outside_torchrun_says_how(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "o" / "c.json"
    assert main(["--distributed", "--target-far", "0.01", "--out", str(out)]) == EXIT_BAD_INPUT
    assert not out.exists()
