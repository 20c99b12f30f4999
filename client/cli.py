"""``python -m client``: the retrieval.v1 calls from a shell, one JSON line per result.

CLI (exit 0 ok, 1 a call failed, 2 usage or local input, 141 the reader closed the pipe)::

    python -m client [--address HOST:PORT] [--api-key KEY] COMMAND ... [--table]
    create-tenant NAME | list-tenants | delete-tenant NAME --yes       (admin key)
    enroll TENANT PATH... [--label L] [--replace]                      files or folders
    match TENANT PATH... [--top-k K] [--target-far A]                  one call per image
    match-batch TENANT PATH... [--batch-size N] [--top-k K] [--target-far A]
    feedback TENANT DECISION_ID same|different
    remove TENANT ITEM_ID...
    tenant TENANT                                                       alias: stats

Output is JSON lines (one object per result, then a summary for enroll), or an aligned
table with ``--table``. Folders are read recursively. An enrolled file's item id is
``<folder>/<file name>``, its folder being the one that holds it, whatever path form
names it (``gallery/`` and ``gallery/*/`` give the same ids), and its label is that
folder's name unless ``--label``. The API key may come from the environment variable
TCM_API_KEY, the address from TCM_ADDRESS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from retrieval.v1.metadata import parse_target_far, retry_after_of

from client.retrieval import ItemRefusedError, MatchResult, RetrievalClient

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_PER_CALL = 256  # the server's limit of images per Enroll / MatchBatch call


class UsageError(Exception):
    """A problem with the command line or the local files: exit 2, nothing was sent."""


def status_of(err: grpc.RpcError) -> dict:
    """The status of a failed call as the CLI prints it: code, message, retry hint."""
    out = {"code": err.code().name, "error": err.details()}
    wait = retry_after_of(err)
    if wait is not None:
        out["retry_after_s"] = wait
    return out


# ---------------------------------------------------------------------------- files
@dataclass(frozen=True)
class ImageFile:
    """One image file to send: its stable item id, where it is, its folder label."""

    item_id: str
    path: Path
    label: str


def image_files(paths: list[Path]) -> Iterator[ImageFile]:
    """Image files of ``paths`` (files, and folders read recursively), in order.

    The id is ``<name of the folder holding the file>/<file name>``: it depends on the
    file, never on how the command line named it, so enrolling ``gallery/`` and
    ``gallery/*/`` gives the same ids and re-enrolling finds them again.
    """
    for path in paths:
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and _is_image(f))
            if not files:
                raise UsageError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.is_file():
            files = [path]
        else:
            raise UsageError(f"no such file or folder: {path}")
        for file in files:
            # the folder as named (a symlinked folder keeps its own name), ".." resolved
            folder = Path(os.path.normpath(Path.cwd() / file)).parent.name
            yield ImageFile(f"{folder}/{file.name}" if folder else file.name, file, folder)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def distinct_items(files: list[ImageFile]) -> list[ImageFile]:
    """``files`` with each file once; two different files with one id are a UsageError
    naming both (the second would be refused as ALREADY_EXISTS, or replace the first)."""
    seen: dict[str, ImageFile] = {}
    out = []
    for f in files:
        first = seen.setdefault(f.item_id, f)
        if first is f:
            out.append(f)
        elif not first.path.samefile(f.path):
            raise UsageError(
                f"two files would get item id {f.item_id!r}: {first.path} and {f.path} "
                "(an id is <folder>/<file name>). Rename one of the folders, or enrol the "
                "two folders into different tenants"
            )
    return out


# --------------------------------------------------------------------------- output
class Output:
    """JSON lines as results arrive, or one aligned table at the end (``--table``).

    Lines are flushed one by one, so ``| head -1`` closes the pipe while the command
    runs; ``main`` then ends quietly instead of printing a BrokenPipeError traceback.
    """

    def __init__(self, table: bool, columns: tuple[str, ...]) -> None:
        self.table, self.columns = table, columns
        self.rows: list[dict] = []
        self.summaries: list[dict] = []

    def row(self, record: dict) -> None:
        if self.table:
            self.rows.append(record)
        else:
            self._line(record)

    def summary(self, record: dict) -> None:
        if self.table:
            self.summaries.append(record)
        else:
            self._line(record)

    @staticmethod
    def _line(record: dict) -> None:
        sys.stdout.write(json.dumps(_finite(record), allow_nan=False) + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if not self.table:
            return
        if self.rows:
            columns = [c for c in self.columns if any(c in r for r in self.rows)]
            cells = [[_cell(r[c]) if c in r else "" for c in columns] for r in self.rows]
            widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
            lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
            lines += ["  ".join("-" * w for w in widths)]
            lines += [
                "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells
            ]
            sys.stdout.write("\n".join(line.rstrip() for line in lines) + "\n")
        for record in self.summaries:
            flat = _flatten(record)
            sys.stdout.write("\n".join(f"{k}: {_cell(v)}" for k, v in flat.items()) + "\n")
        sys.stdout.flush()


def _finite(value):
    """NaN and infinities become None (JSON has neither; ``json.dumps`` would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else "-"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value)
    return str(value)


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


MATCH_COLUMNS = (
    "file",
    "matched",
    "item_id",
    "label",
    "similarity",
    "score",
    "threshold",
    "gallery_size",
    "no_match_reason",
    "code",
    "error",
    "decision_id",
)
COLUMNS = {
    "enroll": ("item_id", "label", "status", "file", "code", "error"),
    "match": MATCH_COLUMNS,
    "match-batch": MATCH_COLUMNS,
    "list-tenants": ("tenant",),
}


# ------------------------------------------------------------------------- commands
def _match_record(file: Path, r: MatchResult) -> dict:
    line = {"file": str(file), **r.__dict__}
    line["neighbors"] = [n.__dict__ for n in r.neighbors]
    if not r.no_match_reason:
        del line["no_match_reason"]
    return line


def _enroll(args: argparse.Namespace, client: RetrievalClient, out: Output) -> int:
    files = distinct_items(list(image_files(args.paths)))
    status, counts, size = 0, {"enrolled": 0, "unchanged": 0, "refused": 0}, 0
    for start in range(0, len(files), MAX_PER_CALL):
        chunk = files[start : start + MAX_PER_CALL]
        items = [
            (f.item_id, f.path.read_bytes(), args.label if args.label is not None else f.label)
            for f in chunk
        ]
        results, size = client.enroll_many(args.tenant, items, args.replace)
        for f, (_, _, label), r in zip(chunk, items, results, strict=True):
            line = {"item_id": r.item_id, "label": label, "file": str(f.path), "ok": r.ok}
            if r.ok:
                line["status"] = "enrolled"
            elif r.error.code == "ALREADY_EXISTS":
                # Enrolling the same files again changes nothing and is no failure.
                line |= {"ok": True, "status": "unchanged"}
                line["note"] = "already enrolled under this id: kept (--replace overwrites it)"
            else:
                line |= {"status": "refused", "code": r.error.code, "error": r.error.message}
                status = 1
            counts[line["status"]] += 1
            out.row(line)
    out.summary({"gallery_size": size, **counts, **_token(client, args.tenant)})
    return status


def _match(args: argparse.Namespace, client: RetrievalClient, out: Output) -> int:
    status = 0
    for f in image_files(args.paths):
        try:
            r = client.match(args.tenant, f.path.read_bytes(), args.top_k, args.target_far)
        except grpc.RpcError as err:
            out.row({"file": str(f.path), **status_of(err)})
            status = 1
            continue
        out.row(_match_record(f.path, r))
    return status


def _match_batch(args: argparse.Namespace, client: RetrievalClient, out: Output) -> int:
    if not 1 <= args.batch_size <= MAX_PER_CALL:
        raise UsageError(f"--batch-size must lie in 1..{MAX_PER_CALL}, got {args.batch_size}")
    files = list(image_files(args.paths))
    status = 0
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images = [f.path.read_bytes() for f in chunk]
        results = client.match_batch(args.tenant, images, args.top_k, args.target_far)
        for f, r in zip(chunk, results, strict=True):
            if isinstance(r, ItemRefusedError):
                out.row({"file": str(f.path), "code": r.code, "error": r.message})
                status = 1
            else:
                out.row(_match_record(f.path, r))
    return status


def _delete_tenant(args: argparse.Namespace, client: RetrievalClient, out: Output) -> int:
    if not args.yes:
        try:
            items = f" and its {client.get_tenant(args.tenant)['gallery_size']} items"
        except grpc.RpcError:
            items = " and its items"
        raise UsageError(
            f"delete-tenant removes tenant {args.tenant!r}{items} for good, with its keys: "
            "pass --yes to do it"
        )
    out.row({"tenant": args.tenant, "removed_items": client.delete_tenant(args.tenant)})
    return 0


def _token(client: RetrievalClient, tenant: str) -> dict:
    """The write token of the last Enroll/Remove, for ``match --read-after`` elsewhere."""
    token = client.write_tokens.get(tenant)
    return {"write_token": token} if token else {}


def _simple(args: argparse.Namespace, client: RetrievalClient, out: Output) -> int:
    if args.command == "create-tenant":
        out.row({"tenant": args.tenant, "api_key": client.create_tenant(args.tenant)})
    elif args.command == "list-tenants":
        for name in client.list_tenants():
            out.row({"tenant": name})
    elif args.command == "feedback":
        matched = client.feedback(args.tenant, args.decision_id, args.verdict == "same")
        out.row({"decision_id": args.decision_id, "matched": matched})
    elif args.command == "remove":
        r = client.remove(args.tenant, args.item_ids)
        line = {"removed": r.removed, "not_found": list(r.not_found)}
        line |= {"gallery_size": r.gallery_size}
        out.summary(line | _token(client, args.tenant))
    else:  # tenant / stats
        out.summary(client.get_tenant(args.tenant))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, RetrievalClient, Output], int]] = {
    "enroll": _enroll,
    "match": _match,
    "match-batch": _match_batch,
    "delete-tenant": _delete_tenant,
}


# --------------------------------------------------------------------------- parser
def _target_far(text: str) -> float:
    try:
        return parse_target_far(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err} (leave it out for the server's default)") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m client",
        description="The retrieval.v1 client: one JSON line per result (--table: a table).",
        epilog="Exit status: 0 ok, 1 a call failed, 2 usage or local files, 141 pipe closed.",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("TCM_ADDRESS", "127.0.0.1:50051"),
        help="server HOST:PORT (or TCM_ADDRESS; default 127.0.0.1:50051)",
    )
    p.add_argument("--api-key", default=os.environ.get("TCM_API_KEY"), help="or TCM_API_KEY")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    p.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, help="client private key (mTLS)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--table", action="store_true", help="an aligned table, not JSON lines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, parents=[common])

    s = command("create-tenant", "create a tenant (admin key); prints its new API key")
    s.add_argument("tenant")
    command("list-tenants", "the tenants' names (admin key)")
    s = command("delete-tenant", "delete a tenant, its gallery and keys (admin key)")
    s.add_argument("tenant")
    s.add_argument("--yes", action="store_true", help="really delete (required)")
    s = command("enroll", "enrol image files or folders; id = <folder>/<file name>")
    s.add_argument("tenant")
    s.add_argument("paths", nargs="+", type=Path)
    s.add_argument("--label", help="label of every item (default: its folder's name)")
    s.add_argument(
        "--replace", action="store_true", help="overwrite items whose id exists (else: unchanged)"
    )
    for name, text in (
        ("match", "match image files or folders, one Match call per image"),
        ("match-batch", "match image files or folders, --batch-size images per MatchBatch call"),
    ):
        s = command(name, text)
        s.add_argument("tenant")
        s.add_argument("paths", nargs="+", type=Path)
        s.add_argument("--top-k", type=int, default=1, help="neighbours to return (default 1)")
        s.add_argument(
            "--target-far",
            type=_target_far,
            default=0.0,
            help="a calibrated target FAR in (0, 1) (default: the server's)",
        )
        s.add_argument(
            "--read-after",
            type=int,
            default=0,
            help="a write_token printed by enroll/remove: see that write on any replica",
        )
        if name == "match-batch":
            s.add_argument(
                "--batch-size",
                type=int,
                default=64,
                help=f"images per call, 1..{MAX_PER_CALL} (default 64)",
            )
    s = command("feedback", "ground truth for a decision")
    s.add_argument("tenant")
    s.add_argument("decision_id")
    s.add_argument("verdict", choices=("same", "different"))
    s = command("remove", "remove items by id")
    s.add_argument("tenant")
    s.add_argument("item_ids", nargs="+")
    for name in ("tenant", "stats"):
        text = "gallery size, threshold, live statistics (NaN is null)"
        s = command(name, text if name == "tenant" else "the same as tenant")
        s.add_argument("tenant")
    return p


def _run(args: argparse.Namespace, client: RetrievalClient) -> int:
    out = Output(args.table, COLUMNS.get(args.command, ()))
    if getattr(args, "read_after", 0):
        client.write_tokens[args.tenant] = args.read_after
    try:
        return COMMANDS.get(args.command, _simple)(args, client, out)
    finally:
        out.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with RetrievalClient(
            args.address, args.api_key, args.timeout, args.tls_ca, args.tls_cert, args.tls_key
        ) as client:
            return _run(args, client)
    except BrokenPipeError:
        # The reader went away (`... | head -1`): stop sending and end quietly, like other
        # Unix tools. stdout is pointed at /dev/null so the interpreter's final flush of
        # what is still buffered does not raise again on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except grpc.RpcError as err:
        status = status_of(err)
        hint = f" (retry after {status['retry_after_s']} s)" if "retry_after_s" in status else ""
        print(f"error: {status['code']}: {status['error']}{hint}", file=sys.stderr)
        return 1
    except (UsageError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
