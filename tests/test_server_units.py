"""Unit tests of the server's parts: image decoding, micro-batcher, keys, decisions, config."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from server.auth import AuthError, KeyRing, hash_key
from server.cli import parse_args
from server.matching.batcher import MicroBatcher, QueueFullError
from server.matching.decisions import DecisionStore
from server.matching.imaging import ImageError, ImageLimits, decode
from server.storage.base import TenantError, check_name

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1_000_000)


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def grey(size: int = 32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L")


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA", "LA", "P", "CMYK", "I;16", "I"])
def test_supported_modes_decode_to_model_channels(mode: str) -> None:
    image = grey().convert(mode) if mode not in ("I;16", "I") else None
    if mode == "I;16":
        wide = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64).astype(np.uint16)
        image = Image.fromarray(wide)  # uint16 -> mode I;16
    elif mode == "I":
        image = Image.fromarray(np.full((32, 32), 65535, np.int32), "I")
    fmt = "TIFF" if mode in ("CMYK", "I") else "PNG"
    data = encode(image, fmt)
    for channels, shape in ((1, (32, 32)), (3, (32, 32, 3))):
        pixels = decode(data, channels, LIMITS)
        assert pixels.shape == shape and pixels.dtype == np.uint8
    if mode == "I":
        assert decode(data, 1, LIMITS).max() == 255  # 16-bit range scaled, not clipped


def test_alpha_is_composited_on_the_background() -> None:
    clear = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert decode(encode(clear), 1, LIMITS).max() == 0
    assert decode(encode(clear), 1, LIMITS, (255, 255, 255)).min() == 255


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty image"),
        (b"not an image at all", "not an image"),
        (encode(grey())[:60], "corrupt or truncated"),
        (b"x" * (2 << 20), "bytes, the limit"),
    ],
)
def test_bad_bytes_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(ImageError, match=why):
        decode(data, 1, LIMITS)


def test_pixel_bomb_is_refused_before_decoding() -> None:
    # 4000x4000 of zeros compresses to a few KB but would need 16 MB once decoded
    bomb = encode(Image.new("L", (4000, 4000)), optimize=True)
    assert len(bomb) < LIMITS.max_bytes
    with pytest.raises(ImageError, match="pixels, the limit"):
        decode(bomb, 1, LIMITS)


def test_a_tiff_tag_of_the_wrong_type_is_refused_not_raised() -> None:
    """Issue 12: StripOffsets (273) typed as ASCII made Pillow raise TypeError."""
    data = bytearray(encode(grey(8), "TIFF"))
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    entries = struct.unpack_from(order + "H", data, ifd)[0]
    tags = [struct.unpack_from(order + "H", data, ifd + 2 + 12 * i)[0] for i in range(entries)]
    assert 273 in tags
    outcomes = set()
    for i in range(entries):
        for kind in range(20):  # every TIFF field type, and some that are not
            bad = bytearray(data)
            struct.pack_into(order + "H", bad, ifd + 2 + 12 * i + 2, kind)
            try:
                decode(bytes(bad), 1, LIMITS)
                outcomes.add("decoded")
            except ImageError:
                outcomes.add("refused")
    assert outcomes == {"decoded", "refused"}  # no other exception escaped


def test_unsupported_format_and_mode() -> None:
    with pytest.raises(ImageError, match="not an image in a supported format"):
        decode(encode(grey(), "PPM"), 1, LIMITS)
    with pytest.raises(ImageError, match="unsupported image mode F"):
        decode(encode(Image.new("F", (4, 4)), "TIFF"), 1, LIMITS)


# ------------------------------------------------------------------ batcher
def test_batcher_merges_concurrent_requests_and_splits_results() -> None:
    calls: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x.reshape(len(x), -1)[:, :2] * 2

    async def scenario() -> list[np.ndarray]:
        from concurrent.futures import ThreadPoolExecutor

        batcher = MicroBatcher(run, ThreadPoolExecutor(1), max_batch=8, max_delay=0.02)
        batcher.start()
        inputs = [np.full((1, 1, 2, 1), i, np.float32) for i in range(6)]
        out = await asyncio.gather(*(batcher.embed(x) for x in inputs))
        await batcher.close()
        return out

    out = asyncio.run(scenario())
    assert [float(o[0, 0]) for o in out] == [0, 2, 4, 6, 8, 10]
    assert calls == [6]  # one model call for six concurrent requests


@pytest.mark.parametrize("elsewhere", [False, True], ids=["in-embed-thread", "after-executor"])
def test_batcher_merges_the_after_calls_of_a_group(elsewhere: bool) -> None:
    """Callers naming the same group share ONE search over all their rows; another group
    and an ungrouped caller get their own; results go back to the right callers, also
    when the searches run in their own executor (Milvus: while the next batch embeds)."""
    searches: list[tuple[str, int]] = []

    def run(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1)[:, :1]

    def search(name: str, rows: np.ndarray) -> list[str]:
        searches.append((name, len(rows)))
        return [f"{name}:{float(r[0]):g}" for r in rows]

    async def scenario():
        from concurrent.futures import ThreadPoolExecutor
        from functools import partial

        after = ThreadPoolExecutor(2) if elsewhere else None
        batcher = MicroBatcher(
            run, ThreadPoolExecutor(1), max_batch=16, max_delay=0.02, after_executor=after
        )
        batcher.start()
        calls = [
            batcher.embed(np.full((2, 1), 1, np.float32), partial(search, "a"), group="a"),
            batcher.embed(np.full((1, 1), 2, np.float32), partial(search, "b"), group="b"),
            batcher.embed(np.full((3, 1), 3, np.float32), partial(search, "a"), group="a"),
            batcher.embed(np.full((1, 1), 4, np.float32), partial(search, "c")),
        ]
        out = await asyncio.gather(*calls)
        await batcher.close()
        return out

    out = asyncio.run(scenario())
    assert out == [["a:1", "a:1"], ["b:2"], ["a:3", "a:3", "a:3"], ["c:4"]]
    assert sorted(searches) == [("a", 5), ("b", 1), ("c", 1)]


def test_batcher_refuses_beyond_its_queue_and_skips_cancelled() -> None:
    gate = threading.Event()
    calls: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        calls.append(len(x))
        return np.zeros((len(x), 2), np.float32)

    async def scenario() -> None:
        from concurrent.futures import ThreadPoolExecutor

        batcher = MicroBatcher(run, ThreadPoolExecutor(1), max_batch=2, max_delay=0, max_queue=3)
        batcher.start()
        first = asyncio.ensure_future(batcher.embed(np.zeros((2, 1, 1, 1), np.float32)))
        await asyncio.sleep(0.05)  # the first batch is now running (blocked on the gate)
        queued = asyncio.ensure_future(batcher.embed(np.zeros((3, 1, 1, 1), np.float32)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="queue full"):
            await batcher.embed(np.zeros((1, 1, 1, 1), np.float32))
        queued.cancel()  # its caller gave up: it must not reach the model
        gate.set()
        await first
        await batcher.close()

    asyncio.run(scenario())
    assert calls == [2]


# -------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name", ["name\n", "a\nb", "../etc", ".hidden", "", "a/b", "x" * 65, "tab\t", "é"]
)
def test_tenant_names_are_checked_whole(name: str) -> None:
    with pytest.raises(TenantError, match="invalid tenant name"):
        check_name(name)


def test_a_tenant_folder_with_a_newline_is_not_loaded(tmp_path: Path) -> None:
    from server.storage.faiss.tenants import TenantRegistry

    registry = TenantRegistry(tmp_path, 4, "sha")
    registry.create("ok", None)
    odd = tmp_path / "tenants" / "odd\n"
    odd.mkdir()
    (odd / "tenant.json").write_text(json.dumps({"name": "odd\n", "keys": []}))
    again = TenantRegistry(tmp_path, 4, "sha")
    again.load_all()
    assert again.names() == ["ok"]


@pytest.mark.parametrize(
    ("item_id", "ok"),
    [("a", True), ("é/ü 1.png", True), ("x" * 256, True), ("id\n", False), ("a\x00", False),
     ("\x85", False), ("", False), ("x" * 257, False)],
)  # fmt: skip
def test_item_ids_are_checked_whole(item_id: str, ok: bool) -> None:
    from server.matching.service import ITEM_ID

    assert bool(ITEM_ID.fullmatch(item_id)) is ok


# --------------------------------------------------------------------- keys
def test_keyring_roles(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"admin": ["adm"], "tenants": {"a": [hash_key("ka")], "b": ["kb"]}}))
    ring = KeyRing.from_file(path)
    ring.authorize((("x-api-key", "adm"),), "b", admin=True)
    ring.authorize((("x-api-key", "ka"),), "a")
    cases = [
        ((), "a", False, grpc.StatusCode.UNAUTHENTICATED),
        ((("x-api-key", "nope"),), "a", False, grpc.StatusCode.UNAUTHENTICATED),
        ((("x-api-key", "kb"),), "a", False, grpc.StatusCode.PERMISSION_DENIED),
        ((("x-api-key", "ka"),), None, True, grpc.StatusCode.PERMISSION_DENIED),
    ]
    for metadata, tenant, admin, code in cases:
        with pytest.raises(AuthError) as err:
            ring.authorize(metadata, tenant, admin)
        assert err.value.code == code
    KeyRing(enabled=False).authorize((), "anything", admin=True)


@pytest.mark.parametrize(
    ("content", "why"),
    [("{", "not valid JSON"), ('{"admin": "k"}', "must be a list"), ("{}", "holds no keys")],
)
def test_bad_key_file(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=why):
        KeyRing.from_file(path)


# ---------------------------------------------------------------- decisions
def test_decision_store_is_bounded() -> None:
    store = DecisionStore(capacity=3)
    ids = [store.add("t", "i1", i % 2 == 0, 1e-3) for i in range(5)]
    assert len(store) == 3
    assert store.get(ids[0], "t", "i1") is None
    assert store.get(ids[4], "t", "i1").matched is True
    assert store.get(ids[3], "t", "i1").target_far == 1e-3


def test_a_decision_belongs_to_the_tenant_instance_that_made_it() -> None:
    """DeleteTenant + CreateTenant with the same name is another incarnation: the old
    instance's decision ids are unknown to it (remembered or signed alike)."""
    for secret in (None, b"s" * 32):
        store = DecisionStore(10, secret)
        decision_id = store.add("shop", "old", True, 1e-2)
        assert store.get(decision_id, "shop", "old") is not None
        assert store.get(decision_id, "shop", "new") is None
        assert store.get(decision_id, "other", "old") is None
        assert DecisionStore(10, secret).get(decision_id, "shop", "new") is None


# ------------------------------------------------------------------- config
def test_config_file_values_and_flag_precedence(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        'target-far = 0.01\nmax_batch = 16\ndata-dir = "/srv/x"\nno_auth = true\n'
        'drift-reference = "baseline"\nmonitor-window = 200\n'
    )
    args = parse_args(["--config", str(config), "--max-batch", "8"])
    assert (args.drift_reference, args.monitor_window) == ("baseline", 200)
    assert (args.target_far, args.max_batch, args.data_dir, args.no_auth) == (
        0.01,
        8,
        Path("/srv/x"),
        True,
    )


@pytest.mark.parametrize("content", ["bogus = 1\n", "target-far = [\n"])
def test_malformed_config_is_a_usage_error(tmp_path: Path, content: str, capsys) -> None:
    config = tmp_path / "server.toml"
    config.write_text(content)
    with pytest.raises(SystemExit) as err:
        parse_args(["--config", str(config)])
    assert err.value.code == 2
    assert "--config" in capsys.readouterr().err


# ---------------------------------------------------------- admission, rates
def test_admission_counts_images_and_bytes_and_hints_the_mean_hold() -> None:
    from server.api.admission import Admission, AdmissionLimits, OverloadedError

    admission = Admission(AdmissionLimits(max_images=4, max_bytes=100))
    first = admission.admit(2, 60)
    with pytest.raises(OverloadedError, match="request bytes") as err:
        admission.admit(1, 50)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    second = admission.admit(2, 40)
    with pytest.raises(OverloadedError, match="4 images in progress"):
        admission.admit(1, 1)
    admission.release(first)
    admission.release(first)  # a ticket is handed back once only
    assert (admission.images, admission.bytes, admission.calls) == (2, 40, 1)
    with pytest.raises(OverloadedError, match="images in progress"):
        admission.admit(3, 1)  # a batch of 3 does not fit next to 2
    admission.release(second)
    assert (admission.images, admission.bytes, admission.calls) == (0, 0, 0)
    assert 0.01 <= admission.retry_after() <= 5.0
    alone = admission.admit(256, 1000)  # larger than both limits, but nothing else runs
    admission.release(alone)


def test_token_bucket_refills_at_its_rate_and_bounds_memory() -> None:
    from server.api.ratelimit import RateLimitedError, TenantRateLimiter

    now = [0.0]
    limiter = TenantRateLimiter(rate=10, burst=5, clock=lambda: now[0], max_buckets=3)
    for _ in range(5):
        limiter.acquire("a", 1)
    with pytest.raises(RateLimitedError) as err:
        limiter.acquire("a", 1)
    assert err.value.retry_after == pytest.approx(0.1)
    now[0] += 0.25  # 2.5 tokens back
    limiter.acquire("a", 2)
    with pytest.raises(RateLimitedError):
        limiter.acquire("a", 1)
    limiter.refund("a", 1)
    limiter.acquire("a", 1)
    limiter.acquire("b", 20)  # larger than the burst: runs on a full bucket, leaves debt
    with pytest.raises(RateLimitedError) as err:
        limiter.acquire("b", 1)
    assert err.value.retry_after == pytest.approx(1.6)  # from -15 back to 1 token
    for name in "cdefgh":
        limiter.acquire(name, 1)
    assert len(limiter) <= 3
    with pytest.raises(ValueError, match="rate"):
        TenantRateLimiter(0)


# ------------------------------------------------------------------ replies
def test_reply_scores_stay_in_their_domain() -> None:
    """float32 inner products of an image with itself gave similarity 1.0000004 and
    distance -3.6e-07 (issue 12): the reply clamps both."""
    from contracts.calibration import Target
    from scorenorm import identity_map
    from server.api.app import _match_response
    from server.matching.service import MatchOutcome
    from server.matching.threshold import TenantThreshold
    from server.storage.faiss.gallery import Hit, SearchResult

    def outcome(hits: list[Hit]) -> MatchOutcome:
        served = TenantThreshold.of(identity_map(), Target(1e-3, 0.9, 1e-3, 1), "none")
        return MatchOutcome("d", True, SearchResult(hits), served, 2)

    hits = [Hit("a", "x", 1.0000004), Hit("b", "y", -1.0000002)]
    reply = _match_response(outcome(hits))
    assert reply.similarity == 1.0 and reply.distance == 0.0 and reply.score == 1.0
    assert [n.similarity for n in reply.neighbors] == [1.0, -1.0]
    assert [n.score for n in reply.neighbors] == [1.0, -1.0]
    far = _match_response(outcome(hits[::-1]))
    assert far.similarity == -1.0 and far.distance == 2.0 and far.score == -1.0


@pytest.mark.parametrize("path", ["/dev/zero", "/tmp", "x" * 5000, "a\x00b", "/nonexistent"])
def test_model_paths_must_be_regular_files(path: str) -> None:
    """Reload takes these paths from an admin call: /dev/zero would be read forever and a
    too long name raised OSError (INTERNAL); found by the request fuzzer."""
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL
    from server.matching.model import ServingModel

    for model, calibration in ((path, DEFAULT_CALIBRATION), (DEFAULT_MODEL, path)):
        with pytest.raises(FileNotFoundError):
            ServingModel.load(model, calibration, "cpu", 1e-3)


def test_signed_decision_ids_are_recognised_by_another_replica_and_cannot_be_forged() -> None:
    from server.matching.decisions import DecisionStore

    secret = b"s" * 32
    here, there = DecisionStore(10, secret), DecisionStore(10, secret)
    decision_id = here.add("shop", "i1", matched=True, target_far=1e-2)
    found = there.get(decision_id, "shop", "i1")
    assert found is not None
    assert (found.tenant, found.incarnation, found.matched, found.target_far) == (
        "shop",
        "i1",
        True,
        1e-2,
    )
    assert there.get(decision_id, "other", "i1") is None  # bound to its tenant
    flipped = decision_id[:24] + "0" + decision_id[25:]  # "not matched", same MAC
    assert there.get(flipped, "shop", "i1") is None
    other_far = here.add("shop", "i1", matched=True, target_far=1e-3)
    moved = decision_id[:25] + other_far[25:41] + decision_id[41:]  # another target
    assert there.get(moved, "shop", "i1") is None
    assert DecisionStore(10, b"t" * 32).get(decision_id, "shop", "i1") is None  # another secret
    assert there.get("é" * len(decision_id), "shop", "i1") is None  # not an error
    assert DecisionStore(10).get(decision_id, "shop", "i1") is None  # no secret: memory only
