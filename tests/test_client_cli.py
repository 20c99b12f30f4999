"""``python -m client`` as a practitioner uses it: stable ids, idempotent enrolment, the
batch and admin commands, tables, pipes, empty galleries and target FAR checks.

The unit tests at the top need no server; the rest run the CLI as a subprocess against
the real server of testing/server_fixtures.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import RetrievalClient
from client.cli import Output, UsageError, distinct_items, image_files
from testing import server_fixtures
from testing.server_fixtures import ADMIN_KEY, ROOT, Assets, ServerProcess

server_assets = server_fixtures.server_assets
auth_server = server_fixtures.auth_server
ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}", "PATH": "/usr/bin:/bin"}


def gallery(root: Path, assets: Assets, layout: dict[str, list[int]]) -> Path:
    """``root/<folder>/<n>.png`` with the glyph rows ``layout[folder]``."""
    for folder, rows in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n, row in enumerate(rows):
            (root / folder / f"{n}.png").write_bytes(assets.png(row))
    return root


# ------------------------------------------------------------------ no server needed
def test_ids_do_not_depend_on_how_the_folder_is_named(tmp_path: Path, monkeypatch) -> None:
    for name in ("A/0.png", "A/1.png", "B/0.png"):
        (tmp_path / "g" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "g" / name).write_bytes(b"png")
    monkeypatch.chdir(tmp_path)
    forms = [
        [Path("g")],
        [Path("g/A"), Path("g/B")],
        [tmp_path / "g/"],
        [Path("g/A/0.png"), Path("g/A/1.png"), Path("g/B/0.png")],
        [Path("g/A/../B/0.png"), Path("g/A/0.png"), Path("g/A/1.png")],
    ]
    ids = [sorted((f.item_id, f.label) for f in image_files(form)) for form in forms]
    assert all(i == ids[0] for i in ids), ids
    assert ids[0] == [("A/0.png", "A"), ("A/1.png", "A"), ("B/0.png", "B")]
    monkeypatch.chdir(tmp_path / "g" / "A")
    assert [f.item_id for f in image_files([Path("0.png")])] == ["A/0.png"]


def test_two_files_with_one_id_are_named(tmp_path: Path) -> None:
    for name in ("x/gal/0.png", "y/gal/0.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"png")
    one = list(image_files([tmp_path / "x", tmp_path / "x/gal"]))  # the same file twice
    assert [f.item_id for f in distinct_items(one)] == ["gal/0.png"]
    with pytest.raises(UsageError) as err:
        distinct_items(list(image_files([tmp_path / "x", tmp_path / "y"])))
    message = str(err.value)
    assert "'gal/0.png'" in message and "x/gal/0.png" in message and "y/gal/0.png" in message
    assert "Rename one of the folders" in message


def test_table_and_json_lines(capsys) -> None:
    rows = [
        {"file": "a.png", "matched": True, "similarity": 0.98765432, "gallery_size": 3},
        {"file": "bb.png", "matched": False, "similarity": None, "no_match_reason": "empty"},
    ]
    out = Output(True, ("file", "matched", "similarity", "no_match_reason", "code"))
    for r in rows:
        out.row(r)
    out.summary({"gallery_size": 3, "stats": {"far": float("nan")}})
    out.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "matched", "similarity", "no_match_reason"]
    assert lines[2].split() == ["a.png", "yes", "0.987654"]
    assert lines[3].split() == ["bb.png", "no", "-", "empty"]
    assert lines[4:] == ["gallery_size: 3", "stats.far: -"]
    out = Output(False, ())
    out.summary({"stats": {"far": float("nan"), "n": [1.0, float("inf")]}})
    assert json.loads(capsys.readouterr().out) == {"stats": {"far": None, "n": [1.0, None]}}


@pytest.mark.parametrize(
    "text", ["0", "-0.0", "1", "1.5", "-1e-3", "nan", "inf", "0.001", "1e-300", "0.5", "abc"]
)
def test_client_and_calibrate_agree_on_a_typed_target_far(text: str) -> None:
    """One rule for a target FAR a person types, in the client and in calibrate."""
    from retrieval.v1.metadata import parse_target_far

    from calibrate.cli.main import parse_fars
    from calibrate.inputs import InputError

    try:
        mine = parse_target_far(text)
    except ValueError:
        mine = None
    try:
        (theirs,) = parse_fars([text])
    except InputError:
        theirs = None
    assert mine == theirs or (mine is None and theirs is None)


# -------------------------------------------------------------------- the real server


def cli(server: ServerProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "client", "--address", server.address,
         "--api-key", ADMIN_KEY, *args],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    if check:
        assert out.returncode == 0, out.stderr
    return out


def lines(out: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.slow
def test_enroll_ids_are_stable_and_enrolling_again_changes_nothing(
    auth_server: ServerProcess, server_assets: Assets, tmp_path: Path
) -> None:
    root = gallery(tmp_path / "gallery", server_assets, {"A": [0, 1], "B": [2], "C": [3, 4]})
    cli(auth_server, "create-tenant", "ids")
    first = lines(cli(auth_server, "enroll", "ids", str(root)))
    ids = ["A/0.png", "A/1.png", "B/0.png", "C/0.png", "C/1.png"]
    assert [r["item_id"] for r in first[:-1]] == ids
    assert [r["label"] for r in first[:-1]] == ["A", "A", "B", "C", "C"]
    assert first[-1] == {"gallery_size": 5, "enrolled": 5, "unchanged": 0, "refused": 0}
    # the same files named another way: the same ids, nothing changes, exit 0
    again = cli(auth_server, "enroll", "ids", *(str(p) for p in sorted(root.iterdir())))
    again_lines = lines(again)
    assert {r["status"] for r in again_lines[:-1]} == {"unchanged"}
    assert again_lines[-1] == {"gallery_size": 5, "enrolled": 0, "unchanged": 5, "refused": 0}
    replaced = lines(cli(auth_server, "enroll", "ids", str(root / "B"), "--replace"))
    assert replaced[-1] == {"gallery_size": 5, "enrolled": 1, "unchanged": 0, "refused": 0}


@pytest.mark.slow
def test_folders_without_label_folders_and_colliding_ids(
    auth_server: ServerProcess, server_assets: Assets, tmp_path: Path
) -> None:
    """``enroll T a/ b/`` with 0.png directly in each: two items, labelled a and b; two
    folders of one name are refused before anything is sent, naming both files."""
    gallery(tmp_path, server_assets, {"a": [0], "b": [5], "x/gal": [6], "y/gal": [7]})
    cli(auth_server, "create-tenant", "flat")
    both = lines(cli(auth_server, "enroll", "flat", str(tmp_path / "a"), str(tmp_path / "b")))
    assert [(r["item_id"], r["label"], r["status"]) for r in both[:-1]] == [
        ("a/0.png", "a", "enrolled"),
        ("b/0.png", "b", "enrolled"),
    ]
    clash = cli(
        auth_server, "enroll", "flat", str(tmp_path / "x"), str(tmp_path / "y"), check=False
    )
    assert clash.returncode == 2 and clash.stdout == ""
    assert "'gal/0.png'" in clash.stderr and "x/gal/0.png" in clash.stderr
    assert "y/gal/0.png" in clash.stderr
    (size,) = lines(cli(auth_server, "tenant", "flat"))
    assert size["gallery_size"] == 2


@pytest.mark.slow
def test_match_batch_decides_like_match_and_prints_gallery_size(
    auth_server: ServerProcess, server_assets: Assets, tmp_path: Path
) -> None:
    root = gallery(tmp_path / "g", server_assets, {"A": [0, 1, 2], "B": [3, 4, 5]})
    queries = gallery(tmp_path / "q", server_assets, {"q": list(range(6, 13))})
    cli(auth_server, "create-tenant", "batch")
    cli(auth_server, "enroll", "batch", str(root))
    single = lines(cli(auth_server, "match", "batch", str(queries), "--top-k", "2"))
    batch = lines(
        cli(auth_server, "match-batch", "batch", str(queries), "--top-k", "2", "--batch-size", "3")
    )
    assert len(single) == len(batch) == 7
    for one, many in zip(single, batch, strict=True):
        for key in ("file", "matched", "item_id", "similarity", "threshold", "neighbors"):
            assert one[key] == many[key], key
        assert many["gallery_size"] == 6
    table = cli(auth_server, "match-batch", "batch", str(queries), "--table").stdout.splitlines()
    assert table[0].split()[:3] == ["file", "matched", "item_id"] and len(table) == 2 + 7
    bad = cli(auth_server, "match-batch", "batch", str(queries), "--batch-size", "0", check=False)
    assert bad.returncode == 2 and "--batch-size" in bad.stderr


@pytest.mark.slow
def test_list_and_delete_tenants(auth_server: ServerProcess, server_assets: Assets) -> None:
    cli(auth_server, "create-tenant", "doomed")
    assert {"tenant": "doomed"} in lines(cli(auth_server, "list-tenants"))
    refused = cli(auth_server, "delete-tenant", "doomed", check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr and refused.stdout == ""
    assert {"tenant": "doomed"} in lines(cli(auth_server, "list-tenants"))
    (done,) = lines(cli(auth_server, "delete-tenant", "doomed", "--yes"))
    assert done == {"tenant": "doomed", "removed_items": 0}
    assert {"tenant": "doomed"} not in lines(cli(auth_server, "list-tenants"))
    table = cli(auth_server, "list-tenants", "--table").stdout.splitlines()
    assert table[0] == "tenant" and set(table[1]) == {"-"}


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(
    auth_server: ServerProcess, server_assets: Assets, tmp_path: Path
) -> None:
    root = gallery(tmp_path / "g", server_assets, {"A": list(range(40))})
    cli(auth_server, "create-tenant", "pipe")
    cli(auth_server, "enroll", "pipe", str(root / "A"))
    client = f"{sys.executable} -m client --address {auth_server.address} --api-key {ADMIN_KEY}"
    for command in ("match", "match-batch --batch-size 1"):
        out = subprocess.run(
            f"{client} {command} pipe {root} | head -1",
            shell=True, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120,
            check=False,
        )  # fmt: skip
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert len(out.stdout.splitlines()) == 1 and json.loads(out.stdout)["matched"]


@pytest.mark.slow
def test_an_empty_gallery_says_so_and_makes_up_no_number(
    auth_server: ServerProcess, server_assets: Assets, tmp_path: Path
) -> None:
    from retrieval.v1 import retrieval_pb2 as pb

    cli(auth_server, "create-tenant", "empty")
    (tmp_path / "q.png").write_bytes(server_assets.png(0))
    (line,) = lines(cli(auth_server, "match", "empty", str(tmp_path / "q.png")))
    assert line["matched"] is False and line["gallery_size"] == 0 and line["neighbors"] == []
    assert line["no_match_reason"] == "the gallery is empty"
    assert line["similarity"] is None and line["distance"] is None and line["score"] is None
    with RetrievalClient(auth_server.address, ADMIN_KEY) as client:
        reply = client.stub.Match(
            pb.MatchRequest(tenant="empty", image=server_assets.png(0)), metadata=client.metadata
        )
        assert not reply.HasField("similarity") and not reply.HasField("distance")
        assert not reply.HasField("score") and reply.item_id == ""
        client.enroll("empty", "one", server_assets.png(0))
        reply = client.stub.Match(
            pb.MatchRequest(tenant="empty", image=server_assets.png(0)), metadata=client.metadata
        )
        # an exact match: distance 0 is present now (a real 0, not a missing value)
        assert reply.HasField("distance") and reply.distance == 0.0 and not reply.no_match_reason
        assert client.match("empty", server_assets.png(0)).distance == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, 2.0, -1e-3, math.nan, math.inf, 1e-3, 0.5])
def test_the_server_and_the_client_refuse_the_same_target_fars(
    auth_server: ServerProcess, server_assets: Assets, value: float
) -> None:
    """The wire rule (0 = the server's default, else (0, 1)) is one function shared by the
    server and the client (retrieval.v1.metadata): both refuse the same values."""
    from retrieval.v1 import retrieval_pb2 as pb

    with RetrievalClient(auth_server.address, ADMIN_KEY) as client:
        if "far" not in client.list_tenants():
            client.create_tenant("far")
            client.enroll("far", "one", server_assets.png(0))
        try:
            client.match("far", server_assets.png(1), target_far=value)
            client_refuses = False
        except ValueError:
            client_refuses = True
        except grpc.RpcError:  # allowed, but not calibrated (0.5): a later refusal
            client_refuses = False
        request = pb.MatchRequest(tenant="far", image=server_assets.png(1), target_far=value)
        try:
            client.stub.Match(request, metadata=client.metadata)
            server_refuses = False
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            server_refuses = "must lie in (0, 1)" in err.details()
    assert client_refuses == server_refuses


@pytest.mark.slow
def test_a_typed_zero_target_far_is_refused_not_served_at_the_default(
    auth_server: ServerProcess, tmp_path: Path, server_assets: Assets
) -> None:
    (tmp_path / "q.png").write_bytes(server_assets.png(0))
    query = str(tmp_path / "q.png")
    out = cli(auth_server, "match", "flow", query, "--target-far", "0", check=False)
    assert out.returncode == 2 and "must lie in (0, 1)" in out.stderr and out.stdout == ""


@pytest.mark.slow
def test_tenant_json_never_holds_nan(auth_server: ServerProcess, server_assets: Assets) -> None:
    """A fresh tenant's live FAR is not estimable yet: the server sends NaN, the CLI null."""
    cli(auth_server, "create-tenant", "fresh")
    raw = cli(auth_server, "tenant", "fresh").stdout

    def refuse(constant: str):
        raise AssertionError(f"{constant} in the CLI's JSON: {raw}")

    info = json.loads(raw, parse_constant=refuse)
    assert info["gallery_size"] == 0
    with RetrievalClient(auth_server.address, ADMIN_KEY) as client:
        from retrieval.v1 import retrieval_pb2 as pb

        stats = client.stub.GetTenant(pb.GetTenantRequest(tenant="fresh"), metadata=client.metadata)
    nan = [k for k, v in stats.stats.items() if np.isnan(v)]
    assert nan, "the server sent no NaN statistic: this test no longer tests anything"
    assert all(info["stats"][k] is None for k in nan)
