"""The layout of docs/ARCHITECTURE.md holds: no import circle, and imports flow one way.

Self-contained (ast over the project's own packages, imports inside functions and under
TYPE_CHECKING included), so it fails the moment a module starts importing back.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "bench",
    "calibrate",
    "client",
    "contracts",
    "demo",
    "embedding",
    "imagesets",
    "reliability",
    "scorenorm",
    "server",
    "testing",
    "train",
)


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package importing its own submodules,
    as re-exports do, is no edge)."""
    known = modules(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                wanted = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for imported in wanted:
                target = imported
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name and not target.startswith(name + "."):
                    targets.add(target)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle(tmp_path: Path) -> None:
    """The check below can fail: a two-module circle (one import inside a function, one
    under TYPE_CHECKING) is found, and a package's re-export of its submodule is not one."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    (pkg / "c.py").write_text("from . import a\n")
    assert circles(import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b"]]


@pytest.fixture(scope="module")
def project() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_no_import_circle(project: dict[str, set[str]]) -> None:
    found = circles(project)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def _imports_of(graph: dict[str, set[str]], prefix: str) -> set[str]:
    return {t for m, ts in graph.items() if m == prefix or m.startswith(prefix + ".") for t in ts}


# (room, what it must never import): the one-way flow of docs/ARCHITECTURE.md
FORBIDDEN = {
    "calibrate": ("server", "train", "client", "demo", "testing"),
    "calibrate.consistency": ("calibrate", "contracts", "scorenorm", "imagesets", "embedding"),
    "calibrate.engine": (
        "calibrate.heldout",
        "calibrate.reports",
        "calibrate.cli",
        "calibrate.studies",
        "calibrate.inputs",
    ),
    "calibrate.heldout": ("calibrate.reports", "calibrate.cli", "calibrate.studies"),
    "calibrate.reports": ("calibrate.cli", "calibrate.studies"),
    "server": (
        "train",
        "client",
        "demo",
        "testing",
        # of calibrate, only the OPIS math (live consistency gauges)
        "calibrate.engine",
        "calibrate.heldout",
        "calibrate.reports",
        "calibrate.cli",
        "calibrate.studies",
        "calibrate.inputs",
    ),
    "server.storage": ("server.api", "server.matching", "server.monitoring", "server.cli"),
    "server.matching": (
        "server.api",
        "server.cli",
        "server.storage.faiss",
        "server.storage.milvus",
    ),
    "server.monitoring": ("server.api", "server.matching", "server.storage", "server.cli"),
    "client": ("server", "calibrate", "train", "testing"),
    "train": ("server", "client", "demo", "testing"),
    "demo": ("server", "train", "testing"),
    "contracts": ("calibrate", "server", "train", "client"),
    "scorenorm": ("calibrate", "server", "train", "client"),
}


@pytest.mark.parametrize(("room", "forbidden"), FORBIDDEN.items(), ids=list(FORBIDDEN))
def test_imports_flow_one_way(
    project: dict[str, set[str]], room: str, forbidden: tuple[str, ...]
) -> None:
    used = _imports_of(project, room)
    if room == "calibrate.consistency":
        used = project[room]  # the leaf itself, not the package around it
    bad = sorted(t for t in used for f in forbidden if t == f or t.startswith(f + "."))
    assert not bad, f"{room} imports {bad}"


def test_the_opis_leaf_loads_without_the_engine() -> None:
    """server/monitoring imports calibrate.consistency: that must not load the engine."""
    code = (
        "import sys\n"
        "import calibrate.consistency, server.monitoring\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('calibrate.'))\n"
        "assert loaded == ['calibrate.consistency'], loaded\n"
        "from calibrate import evaluate, CalibrationInputError\n"
        "assert 'calibrate.engine.evaluate' in sys.modules\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
