"""Generate the Python code of protos/ with grpcio-tools, or check it is up to date.

Usage:
    python scripts/gen_protos.py           # rewrite protos/retrieval/v1/*_pb2*.py(i)
    python scripts/gen_protos.py --check   # exit 1 naming stale files, change nothing

The generated files are committed so that the serving install needs no grpcio-tools;
``--check`` (and tests/test_proto_generated.py) catches a .proto edited without
regenerating.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PROTOS = ("retrieval/v1/retrieval.proto",)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto into ``out_dir``; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return sorted(p for p in out_dir.rglob("*_pb2*.py") if p.is_file())


def stale_files() -> list[str]:
    """Generated files whose committed copy differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            rel = path.relative_to(tmp)
            committed = PROTO_ROOT / rel
            if not committed.is_file() or committed.read_bytes() != path.read_bytes():
                stale.append(str(Path("protos") / rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code, run `python scripts/gen_protos.py`:", *stale, sep="\n  ")
            return 1
        print("generated code is up to date")
        return 0
    for path in generate(PROTO_ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
