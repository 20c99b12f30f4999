"""The committed generated code must match protos/retrieval/v1/retrieval.proto."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts/gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_json_names(file):
    """protoc fills json_name in descriptor sets but not in generated code; ignore it."""
    stack = list(file.message_type)
    while stack:
        message = stack.pop()
        for field in message.field:
            field.ClearField("json_name")
        stack.extend(message.nested_type)
    return file


def test_descriptor_matches_proto(tmp_path: Path) -> None:
    """Version-independent: the compiled descriptor equals the committed one."""
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2
    from retrieval.v1 import retrieval_pb2

    out = tmp_path / "set.pb"
    rc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--descriptor_set_out={out}",
            "retrieval/v1/retrieval.proto",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 0, rc.stderr
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(
        retrieval_pb2.DESCRIPTOR.serialized_pb
    )
    assert _without_json_names(fresh) == _without_json_names(committed), (
        "stale generated code: run `python scripts/gen_protos.py`"
    )


def test_generated_files_are_byte_identical() -> None:
    """With the grpcio-tools that generated them, a fresh run changes nothing."""
    grpc_tools = pytest.importorskip("grpc_tools")
    from importlib.metadata import version

    generated = (ROOT / "protos/retrieval/v1/retrieval_pb2_grpc.py").read_text()
    if f"GRPC_GENERATED_VERSION = '{version('grpcio-tools')}'" not in generated:
        pytest.skip("installed grpcio-tools differs from the one that generated the code")
    assert grpc_tools is not None
    assert _gen_protos().stale_files() == []


def test_stale_proto_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a proto with an extra field is reported stale."""
    pytest.importorskip("grpc_tools")
    gen = _gen_protos()
    proto = tmp_path / "retrieval/v1/retrieval.proto"
    proto.parent.mkdir(parents=True)
    text = (ROOT / "protos/retrieval/v1/retrieval.proto").read_text()
    proto.write_text(
        text.replace(
            "message ListTenantsRequest {}", "message ListTenantsRequest {\n  bool all = 1;\n}"
        )
    )
    monkeypatch.setattr(gen, "PROTO_ROOT", tmp_path)
    for name in ("retrieval_pb2.py", "retrieval_pb2_grpc.py"):
        (tmp_path / "retrieval/v1" / name).write_bytes(
            (ROOT / "protos/retrieval/v1" / name).read_bytes()
        )
    assert "protos/retrieval/v1/retrieval_pb2.py" in gen.stale_files()
