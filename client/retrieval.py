"""A small Python client for retrieval.v1 (``python -m client`` is its CLI, client/cli.py).

with RetrievalClient("127.0.0.1:50051", api_key=KEY) as client:
    client.create_tenant("acme")                 # admin key (or --no-auth)
    client.enroll("acme", "item-1", png_bytes, label="alice")
    result = client.match("acme", query_bytes)   # MatchResult
    client.feedback("acme", result.decision_id, is_same=True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as rpc
from retrieval.v1.metadata import API_KEY, READ_AFTER, WRITE_TOKEN, target_far_error


@dataclass(frozen=True)
class Neighbor:
    item_id: str
    label: str
    similarity: float
    score: float = 0.0  # on the normalised scale


@dataclass(frozen=True)
class MatchResult:
    """One decision. Without a best item (an empty gallery) ``similarity``, ``distance``
    and ``score`` are None and ``no_match_reason`` says why: no number is made up."""

    decision_id: str
    matched: bool
    item_id: str
    similarity: float | None
    threshold: float
    label: str = ""
    distance: float | None = None
    target_far: float = 0.0
    neighbors: list[Neighbor] = field(default_factory=list)
    score: float | None = None  # the top-1 on the normalised scale: matched = score >= threshold
    raw_threshold: float = 0.0  # the tenant's raw similarity that clears threshold
    normalization: str = "none"
    normalization_active: bool = False
    gallery_size: int = 0
    no_match_reason: str = ""

    @classmethod
    def from_proto(cls, r: pb.MatchResponse) -> MatchResult:
        # Item ids are never empty, so an id means there is a best item. (Servers before
        # similarity/distance/score had presence left a 0.0 out of the message, e.g. the
        # distance of an exact match: reading by the id keeps those replies right.)
        best = bool(r.item_id)
        reason = r.no_match_reason or ("" if best else "the gallery is empty")
        return cls(
            r.decision_id,
            r.matched,
            r.item_id,
            r.similarity if best else None,
            r.threshold,
            r.label,
            r.distance if best else None,
            r.target_far,
            [Neighbor(n.item_id, n.label, n.similarity, n.score) for n in r.neighbors],
            r.score if best else None,
            r.raw_threshold,
            r.normalization or "none",
            r.normalization_active,
            r.gallery_size,
            reason,
        )


class ItemRefusedError(RuntimeError):
    """An enrolment item was refused (code = gRPC status name)."""

    def __init__(self, item_id: str, code: str, message: str) -> None:
        super().__init__(f"{item_id}: {code}: {message}")
        self.item_id, self.code, self.message = item_id, code, message


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
        self.metadata = ((API_KEY, api_key),) if api_key else ()
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
        """``target_far`` 0 = the server's default; else it must lie in (0, 1) (ValueError
        before anything is sent, by the rule the server applies)."""
        _check_target_far(target_far)
        request = pb.MatchRequest(
            tenant=tenant, image=image_bytes, top_k=top_k, target_far=target_far
        )
        return MatchResult.from_proto(self._read(self.stub.Match, request))

    def match_batch(
        self, tenant: str, images: list[bytes], top_k: int = 1, target_far: float = 0.0
    ) -> list[MatchResult | ItemRefusedError]:
        """One result per image; a refused image gives an ItemRefusedError in its slot."""
        _check_target_far(target_far)
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
        """GetTenant as a dict; a statistic the monitor cannot estimate yet (NaN on the
        wire, e.g. a live FAR before any decision; or infinite) is None: the dict is valid JSON."""
        info = self._call(self.stub.GetTenant, pb.GetTenantRequest(tenant=tenant))
        return {
            "tenant": info.tenant,
            "gallery_size": info.gallery_size,
            "target_far": info.target_far,
            "threshold": info.threshold,
            "stats": {k: v if math.isfinite(v) else None for k, v in sorted(info.stats.items())},
            "normalization": info.normalization or "none",
            "normalization_active": info.normalization_active,
            "tail_pairs": info.tail_pairs,
            "normalization_min_pairs": info.normalization_min_pairs,
            "raw_threshold": info.raw_threshold,
            "duplicate_pairs": info.duplicate_pairs,
            "traffic_queries": info.traffic_queries,
            "traffic_genuine_share": info.traffic_genuine_share,
            "prior_tenants": info.prior_tenants,
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


def _check_target_far(value: float) -> None:
    why = target_far_error(value, zero_is_default=True)
    if why is not None:
        raise ValueError(why)
