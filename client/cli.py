"""``python -m client``: the retrieval.v1 calls from a shell, one JSON line per result.

CLI (exit 0 ok, 1 a call failed, 2 usage)::

    python -m client --address HOST:PORT [--api-key KEY] create-tenant NAME
    python -m client ... enroll TENANT PATH... [--label L]   # files or folders
    python -m client ... match TENANT PATH... [--top-k K] [--target-far A]
    python -m client ... feedback TENANT DECISION_ID same|different
    python -m client ... remove TENANT ITEM_ID...
    python -m client ... tenant TENANT                          # alias: stats

Folders are read recursively; an enrolled file's item id is its path relative to the
folder (or its file name) and its label the name of its parent folder unless --label.
The API key may also come from the environment variable TCM_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
from retrieval.v1.metadata import retry_after_of

from client.retrieval import RetrievalClient

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def status_of(err: grpc.RpcError) -> dict:
    """The status of a failed call as the CLI prints it: code, message, retry hint."""
    out = {"code": err.code().name, "error": err.details()}
    wait = retry_after_of(err)
    if wait is not None:
        out["retry_after_s"] = wait
    return out


def image_files(paths: list[Path]) -> Iterator[tuple[str, Path, str]]:
    """(item_id, file, folder label) for files and, recursively, images in folders."""
    for path in paths:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    yield str(file.relative_to(path)), file, file.parent.name
        elif path.is_file():
            yield path.name, path, ""
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client", description="retrieval.v1 client")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--api-key", default=os.environ.get("TCM_API_KEY"))
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, help="client private key (mTLS)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("create-tenant", help="create a tenant (admin key); prints its key")
    s.add_argument("tenant")
    s = sub.add_parser("enroll", help="enrol image files or folders")
    s.add_argument("tenant")
    s.add_argument("paths", nargs="+", type=Path)
    s.add_argument("--label", help="label of every item (default: parent folder name)")
    s.add_argument("--replace", action="store_true", help="overwrite existing item ids")
    s = sub.add_parser("match", help="match image files or folders")
    s.add_argument("tenant")
    s.add_argument("paths", nargs="+", type=Path)
    s.add_argument("--top-k", type=int, default=1)
    s.add_argument("--target-far", type=float, default=0.0)
    s.add_argument(
        "--read-after",
        type=int,
        default=0,
        help="a write_token printed by enroll/remove: see that write on any replica",
    )
    s = sub.add_parser("feedback", help="ground truth for a decision")
    s.add_argument("tenant")
    s.add_argument("decision_id")
    s.add_argument("verdict", choices=("same", "different"))
    s = sub.add_parser("remove", help="remove items by id")
    s.add_argument("tenant")
    s.add_argument("item_ids", nargs="+")
    for name in ("tenant", "stats"):
        s = sub.add_parser(name, help="gallery size, threshold and live statistics")
        s.add_argument("tenant")
    return p


def _run(args: argparse.Namespace, client: RetrievalClient) -> int:
    status = 0
    if args.command == "create-tenant":
        key = client.create_tenant(args.tenant)
        print(json.dumps({"tenant": args.tenant, "api_key": key}))
    elif args.command == "enroll":
        items = [
            (item_id, file.read_bytes(), args.label if args.label is not None else label)
            for item_id, file, label in image_files(args.paths)
        ]
        for start in range(0, len(items), 256):
            results, size = client.enroll_many(
                args.tenant, items[start : start + 256], args.replace
            )
            for r in results:
                line = {"item_id": r.item_id, "ok": r.ok}
                if not r.ok:
                    line |= {"code": r.error.code, "error": r.error.message}
                    status = 1
                print(json.dumps(line))
        print(json.dumps({"gallery_size": size, **_token(client, args.tenant)}))
    elif args.command == "match":
        if args.read_after:
            client.write_tokens[args.tenant] = args.read_after
        for _, file, _ in image_files(args.paths):
            try:
                r = client.match(args.tenant, file.read_bytes(), args.top_k, args.target_far)
            except grpc.RpcError as err:
                print(json.dumps({"file": str(file), **status_of(err)}))
                status = 1
                continue
            line = {"file": str(file), **r.__dict__}
            line["neighbors"] = [n.__dict__ for n in r.neighbors]
            print(json.dumps(line))
    elif args.command == "feedback":
        matched = client.feedback(args.tenant, args.decision_id, args.verdict == "same")
        print(json.dumps({"decision_id": args.decision_id, "matched": matched}))
    elif args.command == "remove":
        r = client.remove(args.tenant, args.item_ids)
        line = {"removed": r.removed, "not_found": list(r.not_found)}
        print(json.dumps(line | _token(client, args.tenant)))
    else:
        print(json.dumps(client.get_tenant(args.tenant)))
    return status


def _token(client: RetrievalClient, tenant: str) -> dict:
    """The write token of the last Enroll/Remove, for ``match --read-after`` elsewhere."""
    token = client.write_tokens.get(tenant)
    return {"write_token": token} if token else {}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with RetrievalClient(
            args.address, args.api_key, args.timeout, args.tls_ca, args.tls_cert, args.tls_key
        ) as client:
            return _run(args, client)
    except grpc.RpcError as err:
        status = status_of(err)
        hint = f" (retry after {status['retry_after_s']} s)" if "retry_after_s" in status else ""
        print(f"error: {status['code']}: {status['error']}{hint}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
