"""A small Python client for retrieval.v1, and ``python -m server.client`` on top of it.

    with RetrievalClient("127.0.0.1:50051", api_key=KEY) as client:
        client.create_tenant("acme")                 # admin key (or --no-auth)
        client.enroll("acme", "item-1", png_bytes, label="alice")
        result = client.match("acme", query_bytes)   # MatchResult
        client.feedback("acme", result.decision_id, is_same=True)

CLI (exit 0 ok, 1 a call failed, 2 usage)::

    python -m server.client --address HOST:PORT [--api-key KEY] create-tenant NAME
    python -m server.client ... enroll TENANT PATH... [--label L]   # files or folders
    python -m server.client ... match TENANT PATH... [--top-k K] [--target-far A]
    python -m server.client ... feedback TENANT DECISION_ID same|different
    python -m server.client ... remove TENANT ITEM_ID...
    python -m server.client ... tenant TENANT                          # alias: stats

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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as rpc

from server.errors import retry_after_of

# Read-after-write across replicas (docs/SCALE.md): Enroll and Remove answer with a write
# token in this trailer; a Match that sends it back in READ_AFTER sees that write on any
# replica. Tokens are opaque decimal integers (Milvus timestamps); absent = none needed.
WRITE_TOKEN = "x-tcm-write-token"
READ_AFTER = "x-tcm-read-after"

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Neighbor:
    item_id: str
    label: str
    similarity: float
    score: float = 0.0  # on the normalised scale


@dataclass(frozen=True)
class MatchResult:
    decision_id: str
    matched: bool
    item_id: str
    similarity: float
    threshold: float
    label: str = ""
    distance: float = 0.0
    target_far: float = 0.0
    neighbors: list[Neighbor] = field(default_factory=list)
    score: float = 0.0  # the top-1 on the normalised scale: matched = score >= threshold
    raw_threshold: float = 0.0  # the tenant's raw similarity that clears threshold
    normalization: str = "none"
    normalization_active: bool = False

    @classmethod
    def from_proto(cls, r: pb.MatchResponse) -> MatchResult:
        return cls(
            r.decision_id,
            r.matched,
            r.item_id,
            r.similarity,
            r.threshold,
            r.label,
            r.distance,
            r.target_far,
            [Neighbor(n.item_id, n.label, n.similarity, n.score) for n in r.neighbors],
            r.score,
            r.raw_threshold,
            r.normalization or "none",
            r.normalization_active,
        )


class ItemRefusedError(RuntimeError):
    """An enrolment item was refused (code = gRPC status name)."""

    def __init__(self, item_id: str, code: str, message: str) -> None:
        super().__init__(f"{item_id}: {code}: {message}")
        self.item_id, self.code = item_id, code


class RetrievalClient:
    """Blocking client; errors are ``grpc.RpcError`` with the server's status and message."""

    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        """Plaintext unless a ``tls_*`` file is given: ``tls_ca`` verifies the server
        (system roots when omitted), ``tls_cert`` + ``tls_key`` identify this client (mTLS)."""
        options = [
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
        if tls_ca or tls_cert or tls_key:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            )
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = rpc.RetrievalStub(self.channel)
        self.admin = rpc.AdminStub(self.channel)
        self.metadata = (("x-api-key", api_key),) if api_key else ()
        self.timeout = timeout
        # tenant -> the last write token an Enroll/Remove answered: sent with Match, so
        # this client reads its own writes on any replica (docs/SCALE.md)
        self.write_tokens: dict[str, int] = {}

    def _call(self, method, request):
        return method(request, metadata=self.metadata, timeout=self.timeout)

    def _write(self, method, request):
        """A mutation: remember the write token the server answers with."""
        response, call = method.with_call(request, metadata=self.metadata, timeout=self.timeout)
        for key, value in call.trailing_metadata() or ():
            if key == WRITE_TOKEN:
                old = self.write_tokens.get(request.tenant, 0)
                self.write_tokens[request.tenant] = max(old, int(value))
        return response

    def _read(self, method, request):
        """A Match: carry this client's last write token of the tenant, if any."""
        token = self.write_tokens.get(request.tenant)
        metadata = (*self.metadata, (READ_AFTER, str(token))) if token else self.metadata
        return method(request, metadata=metadata, timeout=self.timeout)

    # ------------------------------------------------------------------ admin
    def create_tenant(self, name: str) -> str:
        """Create a tenant; returns its new API key ("" when the server runs --no-auth)."""
        return self._call(self.admin.CreateTenant, pb.CreateTenantRequest(tenant=name)).api_key

    def delete_tenant(self, name: str) -> int:
        return self._call(
            self.admin.DeleteTenant, pb.DeleteTenantRequest(tenant=name)
        ).removed_items

    def list_tenants(self) -> list[str]:
        return list(self._call(self.admin.ListTenants, pb.ListTenantsRequest()).tenants)

    def reload(self, model_path: str = "", calibration_path: str = "") -> pb.ReloadResponse:
        request = pb.ReloadRequest(model_path=model_path, calibration_path=calibration_path)
        return self._call(self.admin.Reload, request)

    # ----------------------------------------------------------------- tenant
    def enroll(
        self, tenant: str, item_id: str, image_bytes: bytes, label: str = "", replace: bool = False
    ) -> int:
        """Enrol one item; returns the gallery size. Raises ItemRefusedError if refused."""
        (result,), size = self.enroll_many(tenant, [(item_id, image_bytes, label)], replace)
        if not result.ok:
            raise ItemRefusedError(item_id, result.error.code, result.error.message)
        return size

    def enroll_many(
        self, tenant: str, items: list[tuple[str, bytes, str]], replace: bool = False
    ) -> tuple[list[pb.EnrollResult], int]:
        """Enrol (item_id, image, label) items; per-item results and the gallery size."""
        request = pb.EnrollRequest(
            tenant=tenant,
            items=[pb.EnrollItem(item_id=i, image=b, label=lab) for i, b, lab in items],
            replace=replace,
        )
        response = self._write(self.stub.Enroll, request)
        return list(response.results), response.gallery_size

    def match(
        self, tenant: str, image_bytes: bytes, top_k: int = 1, target_far: float = 0.0
    ) -> MatchResult:
        request = pb.MatchRequest(
            tenant=tenant, image=image_bytes, top_k=top_k, target_far=target_far
        )
        return MatchResult.from_proto(self._read(self.stub.Match, request))

    def match_batch(
        self, tenant: str, images: list[bytes], top_k: int = 1, target_far: float = 0.0
    ) -> list[MatchResult | ItemRefusedError]:
        """One result per image; a refused image gives an ItemRefusedError in its slot."""
        request = pb.MatchBatchRequest(
            tenant=tenant, images=images, top_k=top_k, target_far=target_far
        )
        out: list[MatchResult | ItemRefusedError] = []
        for n, r in enumerate(self._read(self.stub.MatchBatch, request).results):
            if r.HasField("match"):
                out.append(MatchResult.from_proto(r.match))
            else:
                out.append(ItemRefusedError(f"image {n}", r.error.code, r.error.message))
        return out

    def feedback(self, tenant: str, decision_id: str, is_same: bool) -> bool:
        """Report ground truth for a decision; returns whether it had matched."""
        request = pb.FeedbackRequest(tenant=tenant, decision_id=decision_id, is_same=is_same)
        return self._call(self.stub.Feedback, request).matched

    def get_tenant(self, tenant: str) -> dict:
        info = self._call(self.stub.GetTenant, pb.GetTenantRequest(tenant=tenant))
        return {
            "tenant": info.tenant,
            "gallery_size": info.gallery_size,
            "target_far": info.target_far,
            "threshold": info.threshold,
            "stats": dict(info.stats),
            "normalization": info.normalization or "none",
            "normalization_active": info.normalization_active,
            "tail_pairs": info.tail_pairs,
            "normalization_min_pairs": info.normalization_min_pairs,
            "raw_threshold": info.raw_threshold,
        }

    def remove(self, tenant: str, item_ids: list[str] | str) -> pb.RemoveResponse:
        ids = [item_ids] if isinstance(item_ids, str) else list(item_ids)
        return self._write(self.stub.Remove, pb.RemoveRequest(tenant=tenant, item_ids=ids))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def status_of(err: grpc.RpcError) -> dict:
    """The status of a failed call as the CLI prints it: code, message, retry hint."""
    out = {"code": err.code().name, "error": err.details()}
    wait = retry_after_of(err)
    if wait is not None:
        out["retry_after_s"] = wait
    return out


# ---------------------------------------------------------------------- CLI
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
    p = argparse.ArgumentParser(prog="python -m server.client", description="retrieval.v1 client")
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
