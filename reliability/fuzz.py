"""``python -m reliability.fuzz``: malformed images and edge-value requests against a live server.

Two layers, one corpus (reliability/corpus.py) plus hypothesis strategies:

1. **decode**: every corpus file, and hypothesis mutations of the seeds, through
   ``server.matching.imaging.decode`` in process: an image comes back or ImageError is
   raised, nothing else.
2. **server**: a real ``python -m server`` with API keys. Corpus files go through
   Match, MatchBatch (between two valid images), Enroll and MatchStream; hypothesis
   draws requests of every RPC with fields at edge values (NaN, +-inf, negative and
   huge numbers, empty, control characters, path traversal, other tenants' names)
   and raw bytes that are not a protobuf message at all.

Pass criteria (a failure is listed with the sample's name; the run exits 1):

* the status of every call is one the RPC may answer (never UNKNOWN or INTERNAL);
* an image is answered exactly as the in-process decoder judges it: refused ->
  INVALID_ARGUMENT in its own slot, decodable -> OK, and never a match (no corpus
  image resembles the gallery's glyphs);
* no gallery changes except by the enrolments that were acknowledged, another
  tenant's gallery not at all;
* no file appears outside the data directory.

The CI subset (tests/test_fuzz_images.py, tests/test_fuzz_server.py) runs the same
checks with a fixed seed and fewer examples; this command prints the counts by
status that docs/RELIABILITY.md reports::

    python -m reliability.fuzz [--examples 2000] [--seed 0] [--write-corpus DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from reliability.corpus import Sample, build
from server.matching.imaging import ImageError, ImageLimits, decode
from server.storage.faiss.tenants import NAME

# The statuses each RPC may give fuzzed input. UNKNOWN and INTERNAL never are.
COMMON = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}
ALLOWED = {
    "Match": COMMON,
    "MatchBatch": COMMON,
    "MatchStream": COMMON,
    "Enroll": COMMON,
    "Remove": COMMON,
    "Feedback": COMMON | {"FAILED_PRECONDITION"},
    "GetTenant": COMMON,
    "CreateTenant": {"OK", "INVALID_ARGUMENT", "ALREADY_EXISTS", "PERMISSION_DENIED"},
    "DeleteTenant": {"OK", "NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT"},
    "ListTenants": {"OK", "PERMISSION_DENIED", "INVALID_ARGUMENT"},
    "Reload": {"OK", "FAILED_PRECONDITION", "PERMISSION_DENIED", "INVALID_ARGUMENT"},
}
EDGE_STRINGS = [
    "", " ", "\n", "\x00", "name\n", "\r\n", "\t", "\x7f", "\x85", "\u2028", "\u202e",
    ".", "..", "../victim", "../../etc/passwd", "/etc/passwd", "victim/../fuzz", "fuzz/..",
    "%2e%2e%2f", "..\\victim", "fuzz\n", " fuzz", "fuzz ", "FUZZ", "victim", "fuzz",
    "x" * 64, "x" * 65, "x" * 256, "x" * 257, "x" * 5000, "𝕏" * 10, "CON", "nul", "*",
]  # fmt: skip
EDGE_FLOATS = [0.0, -0.0, 1e-3, 1e-2, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e300,
               math.inf, -math.inf, math.nan]  # fmt: skip
EDGE_UINTS = [0, 1, 2, 5, 100, 101, 1000, 2**31 - 1, 2**31, 2**32 - 1]


@dataclass
class Tally:
    """Counts by (what, status), and the failures with the input that caused them."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def record(self, what: str, status: str, failure: str | None = None) -> None:
        self.counts[(what, status)] += 1
        if failure is not None:
            self.failures.append(f"{what}: {failure}")

    def by_status(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (what, status), n in sorted(self.counts.items()):
            out.setdefault(what, {})[status] = n
        return out


# ----------------------------------------------------------------- decoding
def decode_outcome(data: bytes, limits: ImageLimits, channels: int = 1) -> str:
    """ "decoded", "refused", or "raised <Exception>" (a failure)."""
    try:
        pixels = decode(data, channels, limits)
    except ImageError:
        return "refused"
    except Exception as err:
        return f"raised {type(err).__name__}: {err}"
    shape_ok = pixels.dtype == np.uint8 and pixels.ndim == (2 if channels == 1 else 3)
    return "decoded" if shape_ok else f"raised bad array {pixels.dtype} {pixels.shape}"


def check_decode(sample: Sample, limits: ImageLimits, tally: Tally) -> None:
    outcome = decode_outcome(sample.data, limits)
    failure = None if outcome in ("decoded", "refused") else f"{sample.name}: {outcome}"
    if sample.kind == "bomb" and outcome == "decoded":
        failure = f"{sample.name}: a decompression bomb was decoded"
    tally.record(f"decode/{sample.kind}", outcome.split(":")[0], failure)


def mutated(seeds: list[Sample]) -> st.SearchStrategy[Sample]:
    """A seed with a few random edits: bit flips, byte sets, cuts, inserted junk."""
    edit = st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
        st.tuples(st.just("set"), st.integers(0, 1 << 16), st.integers(0, 255)),
        st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.integers(0, 0)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(max_size=32)),
    )

    def apply(seed: Sample, edits: list[tuple]) -> Sample:
        data = bytearray(seed.data)
        for op, where, arg in edits:
            if not data:
                break
            at = where % len(data)
            if op == "flip":
                data[at] ^= 1 << arg
            elif op == "set":
                data[at] = arg
            elif op == "cut":
                del data[at:]
            else:
                data[at:at] = arg
        return Sample(f"{seed.name}/edits={edits}", bytes(data), seed.source, "mutated")

    return st.builds(apply, st.sampled_from(seeds), st.lists(edit, min_size=1, max_size=6))


# ------------------------------------------------------------------- server
class ServerFuzzer:
    """Drives a live server; every answer is checked and tallied.

    Tenants: ``fuzz`` (its key is the fuzzer's; a gallery of glyphs), ``victim`` (a
    gallery the fuzzer's key must never reach) and ``scratch`` (fuzzed enrolments).
    """

    def __init__(
        self,
        address: str,
        admin_key: str,
        glyphs: list[bytes],
        data_dir: Path,
        limits: ImageLimits,
        tally: Tally,
        channels: int = 1,
        reload_paths: tuple[str, str] = ("", ""),
    ) -> None:
        from retrieval.v1 import retrieval_pb2 as pb
        from retrieval.v1 import retrieval_pb2_grpc as rpc

        self.pb = pb
        self.address = address
        self.admin_key = admin_key
        self.glyphs = glyphs
        self.data_dir = data_dir
        self.limits = limits
        self.tally = tally
        self.channels = channels
        self.reload_paths = reload_paths
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.stub = rpc.RetrievalStub(self.channel)
        self.admin = rpc.AdminStub(self.channel)
        self.key = ""
        self.scratch: set[str] = set()  # item ids of acknowledged scratch enrolments
        self._serial = 0

    # ------------------------------------------------------------- set-up
    def setup(self, gallery: int = 20) -> None:
        admin = (("x-api-key", self.admin_key),)
        pb = self.pb
        self.key = self.admin.CreateTenant(
            pb.CreateTenantRequest(tenant="fuzz"), metadata=admin
        ).api_key
        self.admin.CreateTenant(pb.CreateTenantRequest(tenant="victim"), metadata=admin)
        self.admin.CreateTenant(pb.CreateTenantRequest(tenant="scratch"), metadata=admin)
        for tenant in ("fuzz", "victim"):
            items = [pb.EnrollItem(item_id=f"g{i}", label=f"l{i}", image=self.glyphs[i])
                     for i in range(gallery)]  # fmt: skip
            reply = self.stub.Enroll(pb.EnrollRequest(tenant=tenant, items=items), metadata=admin)
            assert all(r.ok for r in reply.results), reply
        self.gallery = gallery
        self.snapshot = self._victim_state()

    def _victim_state(self) -> tuple:
        admin = (("x-api-key", self.admin_key),)
        info = self.stub.GetTenant(self.pb.GetTenantRequest(tenant="victim"), metadata=admin)
        best = [
            self.stub.Match(self.pb.MatchRequest(tenant="victim", image=self.glyphs[i]),
                            metadata=admin).item_id
            for i in range(0, self.gallery, 5)
        ]  # fmt: skip
        return info.gallery_size, best

    def _mine(self) -> tuple:
        return (("x-api-key", self.key),)

    def _expect(self, data: bytes) -> str:
        return decode_outcome(data, self.limits, self.channels)

    def _call(self, fn: Callable[[], object]) -> tuple[str, object]:
        try:
            return "OK", fn()
        except grpc.RpcError as err:
            return err.code().name, err

    def _allowed(self, what: str, status: str, detail: str) -> str | None:
        if status not in ALLOWED[what]:
            return f"{status} for {detail}"
        return None

    # ------------------------------------------------------- image checks
    def match(self, sample: Sample) -> None:
        expect = self._expect(sample.data)
        request = self.pb.MatchRequest(tenant="fuzz", image=sample.data, top_k=3)
        status, reply = self._call(lambda: self.stub.Match(request, metadata=self._mine()))
        failure = self._allowed("Match", status, sample.name)
        if failure is None and status != "RESOURCE_EXHAUSTED":
            failure = self._image_verdict(sample, expect, status, reply)
        self.tally.record("server/Match", status, failure)

    def _image_verdict(self, sample: Sample, expect: str, status: str, reply) -> str | None:
        if expect == "refused" and status != "INVALID_ARGUMENT":
            return f"{sample.name}: refused in process, {status} from the server"
        if expect == "decoded":
            if status != "OK":
                return f"{sample.name}: decoded in process, {status} from the server"
            if reply.matched:
                return f"{sample.name}: garbage matched {reply.item_id} ({reply.similarity:.4f})"
        return None

    def batch(self, sample: Sample) -> None:
        expect = self._expect(sample.data)
        images = [self.glyphs[0], sample.data, self.glyphs[1]]
        request = self.pb.MatchBatchRequest(tenant="fuzz", images=images)
        status, reply = self._call(lambda: self.stub.MatchBatch(request, metadata=self._mine()))
        failure = self._allowed("MatchBatch", status, sample.name)
        if failure is None and status == "OK":
            first, middle, last = reply.results
            if not (first.match.item_id == "g0" and last.match.item_id == "g1"):
                failure = f"{sample.name}: the valid images of the batch were not answered"
            elif middle.HasField("error"):
                failure = self._image_verdict(sample, expect, middle.error.code, None)
            else:
                failure = self._image_verdict(sample, expect, "OK", middle.match)
        self.tally.record("server/MatchBatch", status, failure)

    def enroll(self, sample: Sample) -> None:
        expect = self._expect(sample.data)
        self._serial += 1
        item = self.pb.EnrollItem(item_id=f"s{self._serial}", image=sample.data)
        request = self.pb.EnrollRequest(tenant="scratch", items=[item])
        admin = (("x-api-key", self.admin_key),)
        status, reply = self._call(lambda: self.stub.Enroll(request, metadata=admin))
        failure = self._allowed("Enroll", status, sample.name)
        if failure is None and status == "OK":
            (result,) = reply.results
            if result.ok:
                self.scratch.add(result.item_id)
            if result.ok != (expect == "decoded"):
                failure = f"{sample.name}: {expect} in process, enrolment ok={result.ok}"
            elif not result.ok and result.error.code != "INVALID_ARGUMENT":
                failure = f"{sample.name}: refused with {result.error.code}"
        self.tally.record("server/Enroll", status, failure)

    def stream(self, samples: list[Sample]) -> None:
        """Answers in order until the first refused image, which ends the stream."""
        expects = [self._expect(s.data) for s in samples]
        requests = [self.pb.MatchRequest(tenant="fuzz", image=s.data) for s in samples]
        answered: list = []

        def run() -> None:
            for reply in self.stub.MatchStream(iter(requests), metadata=self._mine(), timeout=60):
                answered.append(reply)

        status, _ = self._call(run)
        names = ", ".join(s.name for s in samples)
        failure = self._allowed("MatchStream", status, names)
        if failure is None and status != "RESOURCE_EXHAUSTED":
            first_bad = next((i for i, e in enumerate(expects) if e != "decoded"), None)
            want_status = "OK" if first_bad is None else "INVALID_ARGUMENT"
            want_answers = len(samples) if first_bad is None else first_bad
            if (status, len(answered)) != (want_status, want_answers):
                failure = f"[{names}]: {status} after {len(answered)}, want {want_status} " \
                          f"after {want_answers}"  # fmt: skip
            elif any(r.matched for r in answered):
                failure = f"[{names}]: garbage matched"
        self.tally.record("server/MatchStream", status, failure)

    # ----------------------------------------------------- request fields
    def raw(self, method: str, payload: bytes) -> None:
        """Bytes that may not be a protobuf message at all."""
        service = "Admin" if method in ("CreateTenant", "DeleteTenant", "ListTenants", "Reload") \
            else "Retrieval"  # fmt: skip
        call = self.channel.unary_unary(f"/retrieval.v1.{service}/{method}")
        key = self.admin_key if service == "Admin" else self.key
        status, _ = self._call(lambda: call(payload, metadata=(("x-api-key", key),)))
        failure = self._allowed(method, status, repr(payload))
        if status == "OK" and method in ("CreateTenant", "DeleteTenant"):
            name = getattr(self.pb, _REQUEST[method]).FromString(payload).tenant
            if method == "DeleteTenant" and name in ("fuzz", "victim", "scratch"):
                failure = f"raw bytes deleted {name!r}"  # only by a 1-in-2^40 accident
            elif method == "CreateTenant":  # random bytes may well spell a valid name
                request = self.pb.DeleteTenantRequest(tenant=name)
                self.admin.DeleteTenant(request, metadata=(("x-api-key", self.admin_key),))
        self.tally.record(f"raw/{method}", status, failure)

    def request(self, spec: tuple) -> None:
        """One drawn request: (rpc, fields, as_admin)."""
        method, fields, as_admin = spec
        pb = self.pb
        tenant = fields.get("tenant", "")
        if method == "DeleteTenant" and tenant in ("fuzz", "victim", "scratch"):
            return  # deleting the fixtures is allowed, not interesting
        if method in ("Enroll", "Remove") and tenant == "fuzz":
            fields = {**fields, "tenant": "scratch"}  # mutations that may succeed go there
            as_admin = True
        elif method in ("Enroll", "Remove") and tenant == "victim":
            as_admin = False  # the fuzz key must be refused
        metadata = (("x-api-key", self.admin_key if as_admin else self.key),)
        message = getattr(pb, _REQUEST[method])(**fields)
        stub = self.admin if method in _ADMIN else self.stub
        status, reply = self._call(lambda: getattr(stub, method)(message, metadata=metadata))
        failure = self._allowed(method, status, repr(fields)[:300])
        if failure is None:
            failure = self._field_verdict(method, fields, as_admin, status, reply)
        self.tally.record(f"fields/{method}", status, failure)

    def _field_verdict(self, method, fields, as_admin, status, reply) -> str | None:
        tenant = fields.get("tenant", "")
        if not as_admin and method not in _ADMIN and tenant != "fuzz" and status == "OK":
            return f"the fuzz key reached tenant {tenant!r}"
        if method == "CreateTenant" and status == "OK":
            if not NAME.fullmatch(tenant):
                return f"created a tenant named {tenant!r}"
            metadata = (("x-api-key", self.admin_key),)
            self.admin.DeleteTenant(self.pb.DeleteTenantRequest(tenant=tenant), metadata=metadata)
        if method == "CreateTenant" and status == "INVALID_ARGUMENT" and NAME.fullmatch(tenant):
            return f"refused the valid name {tenant!r}"
        if method == "Enroll" and status == "OK":
            done = {r.item_id for r in reply.results if r.ok}
            if tenant == "scratch":
                self.scratch |= done
            elif done:
                return f"enrolled into {tenant!r}"
        if method == "Remove" and status == "OK":
            gone = set(fields["item_ids"]) - set(reply.not_found)
            if tenant == "scratch":
                self.scratch -= gone
            elif gone:
                return f"removed {sorted(gone)} from {tenant!r}"
        if method == "Match" and status == "OK":
            far = fields.get("target_far", 0.0)
            if math.isnan(far) or not (far == 0 or 0 < far < 1):
                return f"target_far {far!r} was accepted"
        if method == "Reload" and status == "OK":
            paths = (fields.get("model_path", ""), fields.get("calibration_path", ""))
            if any(p and p not in self.reload_paths for p in paths):
                return f"reloaded from {paths}"
        return None

    # -------------------------------------------------------- invariants
    def check_invariants(self, sandbox: Path) -> None:
        """Galleries unchanged but by acknowledged enrolments; nothing outside the data dir."""
        admin = (("x-api-key", self.admin_key),)
        failures = []
        if self._victim_state() != self.snapshot:
            failures.append(
                f"the victim's gallery changed: {self.snapshot} -> {self._victim_state()}"
            )
        sizes = {
            t: self.stub.GetTenant(self.pb.GetTenantRequest(tenant=t), metadata=admin).gallery_size
            for t in ("fuzz", "scratch")
        }
        want = {"fuzz": self.gallery, "scratch": len(self.scratch)}
        if sizes != want:
            failures.append(f"gallery sizes {sizes}, want {want}")
        tenants = set(self.admin.ListTenants(self.pb.ListTenantsRequest(), metadata=admin).tenants)
        if tenants != {"fuzz", "victim", "scratch"}:
            failures.append(f"tenants are {sorted(tenants)}")
        outside = sorted(str(p) for p in sandbox.iterdir() if p != self.data_dir)
        if outside:
            failures.append(f"files outside the data dir: {outside}")
        folders = sorted(p.name for p in (self.data_dir / "tenants").iterdir())
        if any(not NAME.fullmatch(f) for f in folders):
            failures.append(f"odd tenant folders: {folders!r}")
        for failure in failures:
            self.tally.failures.append(f"invariant: {failure}")
        self.tally.record("invariants", "OK" if not failures else "FAILED")

    def close(self) -> None:
        self.channel.close()


_ADMIN = {"CreateTenant", "DeleteTenant", "ListTenants", "Reload"}
_REQUEST = {
    "Match": "MatchRequest", "MatchBatch": "MatchBatchRequest", "Enroll": "EnrollRequest",
    "Remove": "RemoveRequest", "Feedback": "FeedbackRequest", "GetTenant": "GetTenantRequest",
    "CreateTenant": "CreateTenantRequest", "DeleteTenant": "DeleteTenantRequest",
    "ListTenants": "ListTenantsRequest", "Reload": "ReloadRequest",
}  # fmt: skip


def texts(max_size: int = 300) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(EDGE_STRINGS), st.text(max_size=max_size))


def requests(images: list[bytes], reload_paths: tuple[str, str]) -> st.SearchStrategy[tuple]:
    """(rpc, fields, as_admin) with every field at edge values."""
    from retrieval.v1 import retrieval_pb2 as pb

    image = st.one_of(st.sampled_from(images), st.binary(max_size=512))
    far = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats())
    top_k = st.one_of(st.sampled_from(EDGE_UINTS), st.integers(0, 2**32 - 1))
    tenant = st.one_of(st.sampled_from(["fuzz", "victim", "scratch"]), texts())
    item = st.builds(lambda i, lab, img: pb.EnrollItem(item_id=i, label=lab, image=img),
                     texts(), texts(), image)  # fmt: skip
    admin = st.booleans()
    odd_paths = ["", "/dev/zero", "/proc/self/environ", "/tmp", "/etc/passwd", "../../etc/passwd",
                 "\x00", *reload_paths]  # fmt: skip
    path = st.one_of(st.sampled_from(odd_paths), texts())
    fields = {
        "Match": st.fixed_dictionaries(
            {"tenant": tenant, "image": image, "top_k": top_k, "target_far": far}),
        "MatchBatch": st.fixed_dictionaries(
            {"tenant": tenant, "images": st.lists(image, max_size=8), "top_k": top_k,
             "target_far": far}),
        "Enroll": st.fixed_dictionaries(
            {"tenant": tenant, "items": st.lists(item, max_size=4), "replace": st.booleans()}),
        "Remove": st.fixed_dictionaries(
            {"tenant": tenant, "item_ids": st.lists(texts(), max_size=4)}),
        "Feedback": st.fixed_dictionaries(
            {"tenant": tenant, "decision_id": texts(), "is_same": st.booleans()}),
        "GetTenant": st.fixed_dictionaries({"tenant": tenant}),
        "CreateTenant": st.fixed_dictionaries({"tenant": texts(80)}),
        "DeleteTenant": st.fixed_dictionaries({"tenant": texts(80)}),
        "ListTenants": st.just({}),
        "Reload": st.fixed_dictionaries({"model_path": path, "calibration_path": path}),
    }  # fmt: skip
    return st.one_of(
        *(st.tuples(st.just(m), f, admin) for m, f in fields.items() if m not in _ADMIN),
        *(st.tuples(st.just(m), f, st.just(True)) for m, f in fields.items() if m in _ADMIN),
        *(st.tuples(st.just(m), f, st.just(False)) for m, f in fields.items() if m in _ADMIN),
    )


def raw_messages() -> st.SearchStrategy[tuple[str, bytes]]:
    methods = sorted(ALLOWED)
    methods.remove("MatchStream")
    return st.tuples(st.sampled_from(methods), st.binary(max_size=256))


def run_examples(strategy, check: Callable, examples: int, seed: int) -> None:
    """Run ``check`` on ``examples`` draws of ``strategy`` (outside pytest as well)."""

    @hypothesis_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)  # fmt: skip
    @given(strategy)
    def property_holds(value) -> None:
        check(value)

    property_holds()


# ------------------------------------------------------------------ command
def peak_rss_mb(pid: int) -> float:
    """VmHWM (the process's peak resident set) from /proc, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m reliability.fuzz", description=__doc__.splitlines()[0]
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=2000, help="hypothesis examples per strategy")
    p.add_argument("--server-samples", type=int, default=0,
                   help="corpus files sent through each RPC (0 = all)")  # fmt: skip
    p.add_argument("--write-corpus", type=Path, help="also write the corpus files here")
    p.add_argument("--report", type=Path, help="write the counts as JSON here")
    args = p.parse_args(argv)
    started = time.monotonic()
    corpus = build(args.seed)
    if args.write_corpus:
        args.write_corpus.mkdir(parents=True, exist_ok=True)
        for n, sample in enumerate(corpus):
            safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in sample.name)[:120]
            (args.write_corpus / f"{n:05d}-{safe}").write_bytes(sample.data)
    tally = Tally()
    limits = ImageLimits(max_bytes=300_000, max_pixels=1_000_000)
    print(f"corpus: {len(corpus)} files, {sum(len(s.data) for s in corpus) / 1e6:.1f} MB "
          f"(seed {args.seed}); {Counter(s.kind for s in corpus)}", flush=True)  # fmt: skip
    for sample in corpus:
        check_decode(sample, limits, tally)
    seeds = [s for s in corpus if s.kind == "seed"]
    run_examples(mutated(seeds), lambda s: check_decode(s, limits, tally), args.examples, args.seed)
    print(f"decode layer done ({time.monotonic() - started:.0f} s)", flush=True)
    peak = fuzz_server(corpus, args, limits, tally)
    report = {
        "seed": args.seed,
        "corpus_files": len(corpus),
        "corpus_by_kind": dict(Counter(s.kind for s in corpus)),
        "hypothesis_examples_per_strategy": args.examples,
        "counts": tally.by_status(),
        "failures": tally.failures,
        "server_peak_rss_mib": round(peak, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    return 1 if tally.failures else 0


def fuzz_server(corpus: list[Sample], args, limits: ImageLimits, tally: Tally) -> float:
    """The server layer on a fresh server; returns the server's peak RSS in MiB."""
    from imagesets import load_images
    from testing.server_fixtures import ADMIN_KEY, LIMIT_FLAGS, make_assets, png, start_server

    glyphs = load_images("glyphs-tiny", "test")
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(len(glyphs), 400, replace=False))
    work = Path(tempfile.mkdtemp(prefix="tcm-fuzz-"))
    try:
        assets = make_assets(work / "assets", glyphs.pixels[pick], np.asarray(glyphs.labels)[pick])
        sandbox = work / "sandbox"
        data_dir = sandbox / "data"
        server = start_server(assets, data_dir, "--api-keys", str(assets.keys), *LIMIT_FLAGS)
        reload_paths = (str(assets.model), str(assets.calibration))
        fuzzer = ServerFuzzer(server.address, ADMIN_KEY, [png(p) for p in glyphs.pixels[pick]],
                              data_dir, limits, tally, reload_paths=reload_paths)  # fmt: skip
        try:
            fuzzer.setup()
            images = list(corpus)
            random.Random(args.seed).shuffle(images)
            if args.server_samples:
                images = images[: args.server_samples]
            for sample in images:
                fuzzer.match(sample)
                fuzzer.batch(sample)
                fuzzer.enroll(sample)
            for start in range(0, len(images), 5):
                fuzzer.stream(images[start : start + 5])
            print(f"server corpus layer done: {len(images)} files x 4 RPCs", flush=True)
            small = [s.data for s in images[:200]] + fuzzer.glyphs[:5]
            run_examples(requests(small, reload_paths), fuzzer.request, args.examples, args.seed)
            run_examples(raw_messages(), lambda m: fuzzer.raw(*m), args.examples, args.seed)
            fuzzer.check_invariants(sandbox)
            peak = peak_rss_mb(server.proc.pid)
        finally:
            fuzzer.close()
            code = server.stop()
            if code != 0:
                tally.failures.append(f"server exit code {code}:\n{server.log()[-2000:]}")
            for line in server.log().splitlines():
                if "Traceback" in line or " ERROR " in line:
                    tally.failures.append(f"server log: {line}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return peak


if __name__ == "__main__":
    sys.exit(main())
