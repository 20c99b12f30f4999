"""``python -m server``: serve retrieval.v1 over gRPC with Prometheus metrics.

Prints one line when ready::

    serving retrieval.v1 on HOST:PORT, metrics on http://HOST:MPORT/metrics

SIGTERM/SIGINT drain in-flight calls, then flush and close the galleries; SIGHUP
reloads model + calibration from the paths given at start and re-reads the API keys
(which are also re-read whenever their files change, see server/api/keys.py).
Exit status 2 = refused to start (bad flag, config, model, calibration or key file).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from threadpoolctl import threadpool_limits

import scorenorm
from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL
from scorenorm.evidence import EvidenceSettings
from server.api.admission import Admission, AdmissionLimits, OverloadMetrics
from server.api.app import MAX_MESSAGE, MAX_PENDING_CALLS, build_server
from server.api.audit import AuditLog
from server.api.forward import Forwarder
from server.api.interceptor import RetrievalInterceptor
from server.api.keys import KeyReloader
from server.api.ratelimit import TenantRateLimiter
from server.auth import KeyRing
from server.errors import StatusError
from server.matching.imaging import ImageLimits
from server.matching.model import ServingModel
from server.matching.observer import DecisionObserver, NullObserver
from server.matching.service import RetrievalService, ServiceConfig
from server.matching.statistics import StatisticsSettings
from server.monitoring.labels import DEFAULT_BUCKETS, DEFAULT_MAX_NAMED, TenantLabels
from server.monitoring.serving import ServerMetrics
from server.storage.base import TailOptions
from server.storage.tail_stats import DEFAULT_CAPACITY

log = logging.getLogger("server")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="TOML file of these options (flags win)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="embedder .onnx")
    p.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION, help="its calibration")
    p.add_argument("--target-far", type=float, default=1e-3, help="default target FAR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 = pick a free one")
    p.add_argument("--metrics-port", type=int, default=9464, help="0 = pick a free one")
    p.add_argument("--data-dir", type=Path, default=Path("out/server"), help="galleries, logs")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--no-auth", action="store_true", help="no API keys (local use only)")
    auth.add_argument("--api-keys", type=Path, help="JSON key file (see server/auth.py)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC over TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates (mTLS)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--embed-threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads; 0 = per core (1: least CPU per image, "
        "docs/SERVER.md 'Per-call cost')",
    )
    p.add_argument("--max-batch", type=int, default=64, help="images per onnxruntime call")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="wait for a batch to fill")
    p.add_argument("--max-queue", type=int, default=2048, help="queued images before refusing")
    o = p.add_argument_group("overload and abuse (docs/RELIABILITY.md)")
    o.add_argument(
        "--max-inflight",
        type=int,
        default=64,
        help="images of admitted calls worked on at once; beyond: RESOURCE_EXHAUSTED + retry hint",
    )
    o.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=256 << 20,
        help="request bytes worked on at once; beyond: RESOURCE_EXHAUSTED + retry hint",
    )
    o.add_argument(
        "--max-pending-calls",
        type=int,
        default=MAX_PENDING_CALLS,
        help="gRPC core backlog of calls not yet picked up (a memory backstop)",
    )
    o.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=0,
        help="HTTP/2 concurrent calls per client connection; the excess is refused "
        "UNAVAILABLE by gRPC before it costs the server anything (0 = gRPC's default)",
    )
    o.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=0,
        help="calls handled at once; gRPC answers the excess RESOURCE_EXHAUSTED before any "
        "Python runs (0 = no limit)",
    )
    o.add_argument(
        "--tenant-rate",
        type=float,
        default=0.0,
        help="images per second per tenant (0 = no per-tenant limit)",
    )
    o.add_argument(
        "--tenant-burst", type=float, help="per-tenant bucket depth in images (default: the rate)"
    )
    o.add_argument(
        "--audit-log", type=Path, help="JSON lines of Admin calls (default: DATA_DIR/audit.log)"
    )
    o.add_argument(
        "--keys-poll-seconds",
        type=float,
        default=2.0,
        help="re-read changed key files this often (0 = only on SIGHUP)",
    )
    p.add_argument("--max-image-bytes", type=int, default=8 << 20)
    p.add_argument("--max-image-pixels", type=int, default=16_000_000)
    p.add_argument(
        "--index",
        choices=("flat", "hnsw"),
        default="flat",
        help="flat = exact search; hnsw = approximate top-k for very large galleries",
    )
    g = p.add_argument_group("where galleries live (server/storage/, docs/SCALE.md)")
    g.add_argument(
        "--gallery",
        default="faiss",
        help="faiss (in this process, under --data-dir), milvus://HOST:PORT (shared by "
        "replicas), or milvus-lite:PATH.db (tests)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing --port via SO_REUSEPORT; with the faiss store one "
        "writes the data dir and the others follow it (docs/SCALE.md)",
    )
    g.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT (set by --workers)")
    # set by --workers for its faiss processes (server/workers.py), not by hand
    g.add_argument("--role", choices=("", "writer", "reader"), default="", help=argparse.SUPPRESS)
    g.add_argument("--writer-socket", type=Path, default=None, help=argparse.SUPPRESS)
    g.add_argument("--replica", default="", help=argparse.SUPPRESS)
    g.add_argument(
        "--milvus-timeout",
        type=float,
        default=5.0,
        help="seconds per Milvus call before the request fails DEADLINE_EXCEEDED or UNAVAILABLE",
    )
    g.add_argument(
        "--milvus-consistency",
        choices=("session", "strong"),
        default="session",
        help="session: own writes, and any write whose token the Match carries; strong: "
        "every write (slower)",
    )
    g.add_argument(
        "--store-refresh-seconds",
        type=float,
        default=10.0,
        help="how often a shared store's tenants, keys, sizes and tail samples are re-read",
    )
    p.add_argument(
        "--search-threads",
        type=int,
        default=1,
        help="faiss OpenMP threads per search (1 suits micro-batches; more for huge galleries)",
    )
    n = p.add_argument_group("score normalisation (scorenorm/, docs/CONSISTENCY.md)")
    n.add_argument(
        "--normalize",
        type=scorenorm.choice(servable_only=True),
        default=None,
        metavar="{" + ",".join(scorenorm.names(servable_only=True)) + "}",
        help="map each tenant's scores onto the calibration's scale before the threshold "
        "(default: what the calibration document was made for; none for older documents)",
    )
    n.add_argument(
        "--tail-sample",
        type=int,
        default=DEFAULT_CAPACITY,
        help="gallery items per tenant whose pairs estimate its impostor tail",
    )
    defaults = EvidenceSettings()
    n.add_argument(
        "--traffic-share",
        type=float,
        default=defaults.traffic_share,
        help="most of what a tenant's estimate rests on (gallery pairs and the prior's "
        "pseudo-pairs) its unlabelled traffic may make up "
        f"(default {defaults.traffic_share}; 0 = gallery pairs only)",
    )
    n.add_argument(
        "--prior-pairs",
        type=float,
        default=defaults.prior_pairs,
        help="pseudo-pairs of the deployment prior (all tenants pooled) in each tenant's "
        f"estimate (default {defaults.prior_pairs:g}; 0 = no prior)",
    )
    n.add_argument(
        "--sync-seconds",
        type=float,
        default=StatisticsSettings().sync_seconds,
        help="how often traffic evidence is published to the store and every replica's "
        "read back; decisions use it from then on (the lag of a new customer's correction)",
    )
    m = p.add_argument_group("live monitoring (server/monitoring, docs/MONITORING.md)")
    m.add_argument(
        "--monitor-window", type=int, default=1000, help="decisions per tenant window; 0 = no cap"
    )
    m.add_argument(
        "--monitor-window-seconds", type=float, default=0.0, help="window age limit; 0 = none"
    )
    m.add_argument(
        "--max-tenant-labels",
        type=int,
        default=DEFAULT_MAX_NAMED,
        help="tenants named in metric labels while the store holds more: those with the "
        "smallest name hash; the rest share --tenant-label-buckets labels (docs/METRICS.md)",
    )
    m.add_argument(
        "--tenant-label-buckets",
        type=int,
        default=DEFAULT_BUCKETS,
        help="bucket labels (_bucket-NN, NN = name hash mod this) for tenants beyond the cap",
    )
    m.add_argument(
        "--drift-reference",
        choices=("calibration", "baseline"),
        default="calibration",
        help="score drift against the calibration histogram or each tenant's own baseline",
    )
    m.add_argument(
        "--baseline-decisions", type=int, default=1000, help="decisions forming that baseline"
    )
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain on shutdown")
    p.add_argument("--log-level", default="INFO")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags over config-file values over defaults; a bad config is a usage error."""
    p = parser()
    args = p.parse_args(argv)
    if args.config is None:
        return args
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover
        p.error("--config needs Python 3.11 or later (tomllib)")
    try:
        values = tomllib.loads(args.config.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        p.error(f"--config {args.config}: {err}")
    known = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in known:
            p.error(f"--config {args.config}: unknown option {key!r}")
        kind = known[dest].type
        defaults[dest] = kind(value) if kind and not isinstance(value, bool) else value
    p.set_defaults(**defaults)
    return p.parse_args(argv)


def make_observer(
    args: argparse.Namespace, registry: CollectorRegistry, model: ServingModel, labels
) -> DecisionObserver:
    """LiveMonitor when server.monitoring provides it, else NullObserver."""
    try:
        from server.monitoring import LiveMonitor
    except ImportError:
        log.warning("server.monitoring.LiveMonitor unavailable: live FAR gauges are off")
        return NullObserver()
    return LiveMonitor(
        args.target_far,
        registry=registry,
        reference_top1=model.reference_top1,
        labels=labels,
        window_decisions=args.monitor_window or None,
        window_seconds=args.monitor_window_seconds or None,
        drift_reference=args.drift_reference,
        baseline_decisions=args.baseline_decisions,
    )


def tls_credentials(args: argparse.Namespace):
    """grpc server credentials from the --tls-* flags, or None for plaintext."""
    import grpc

    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    ca = args.tls_client_ca.read_bytes() if args.tls_client_ca else None
    pair = (args.tls_key.read_bytes(), args.tls_cert.read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


async def serve(args: argparse.Namespace) -> int:
    # numpy's BLAS must not fork its own threads per call: the server runs its GEMMs
    # (statistics against the tail sample, flat search) in its own thread pools, and a
    # 1 x 4096 product that wakes BLAS threads cost 13 ms instead of 0.8 ms on a busy
    # 2-core machine (bench.normalization)
    threadpool_limits(limits=1, user_api="blas")
    if args.no_auth:
        keys = KeyRing(enabled=False)
        log.warning("authentication is OFF (--no-auth): any caller reaches every tenant")
    else:
        keys = KeyRing.from_file(args.api_keys)
    model = ServingModel.load(
        args.model,
        args.calibration,
        args.device,
        args.target_far,
        args.embed_threads,
        args.normalize,
    )
    registry = CollectorRegistry()
    # one mapping for serving and monitoring; no _created series (a second series per
    # counter child that no rule reads: docs/METRICS.md, "Cost")
    disable_created_metrics()
    labels = TenantLabels(args.max_tenant_labels, args.tenant_label_buckets)
    metrics = ServerMetrics(registry, labels=labels)
    observer = make_observer(args, registry, model, labels)
    config = ServiceConfig(
        max_batch=args.max_batch,
        max_delay=args.max_delay_ms / 1000,
        max_queue=args.max_queue,
        index=args.index,
        search_threads=args.search_threads,
        limits=ImageLimits(args.max_image_bytes, args.max_image_pixels),
        normalize=args.normalize,
        tail=TailOptions(args.tail_sample),
        statistics=statistics_settings(args),
        gallery=args.gallery,
        store_options=store_options(args),
        replica=args.replica,
    )
    service = RetrievalService(model, args.data_dir, keys, observer, metrics, config)
    await service.start()
    audit = AuditLog(args.audit_log or args.data_dir / "audit.log")
    limits = AdmissionLimits(args.max_inflight, args.max_inflight_bytes)
    admission = Admission(limits, OverloadMetrics(registry))
    interceptor = RetrievalInterceptor(
        keys,
        metrics,
        admission,
        TenantRateLimiter(args.tenant_rate, args.tenant_burst) if args.tenant_rate > 0 else None,
        audit,
        follow=service.follow_tenant if args.role == "reader" else None,
    )
    forwarder = None
    if args.role == "reader":  # its writes go to the writer worker (server/api/forward.py)
        forwarder = Forwarder(f"unix:{args.writer_socket}", MAX_MESSAGE)
    server, health = build_server(
        service,
        args.device,
        interceptor,
        args.max_pending_calls,
        args.max_streams_per_connection,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        reuse_port=args.reuse_port,
        forwarder=forwarder,
    )
    if args.role == "writer":  # where the reader workers forward their writes
        args.writer_socket.unlink(missing_ok=True)
        if server.add_insecure_port(f"unix:{args.writer_socket}") == 0:
            raise OSError(f"cannot bind the writer socket {args.writer_socket}")
    credentials = tls_credentials(args)
    address = f"{args.host}:{args.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
        log.info("TLS on%s", " with client certificates required (mTLS)" * bool(args.tls_client_ca))
    if port == 0:
        raise OSError(f"cannot bind {args.host}:{args.port}")
    http, _ = start_http_server(args.metrics_port, addr=args.host, registry=registry)
    await server.start()
    print(
        f"serving retrieval.v1 on {args.host}:{port}, "
        f"metrics on http://{args.host}:{http.server_port}/metrics",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background: set[asyncio.Task] = {loop.create_task(admission.watch_loop())}
    reloader = KeyReloader(keys, args.api_keys, args.data_dir) if keys.enabled else None
    if reloader is not None and args.keys_poll_seconds > 0:
        background.add(loop.create_task(reloader.watch(args.keys_poll_seconds)))
    if service.tenants.shared and args.store_refresh_seconds > 0:
        background.add(loop.create_task(_follow_store(service, args.store_refresh_seconds)))

    def on_hup() -> None:
        if reloader is not None:
            reloader.poll(force=True)
        task = loop.create_task(_reload(service, args.device))
        background.add(task)
        task.add_done_callback(background.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    log.info("shutting down: draining in-flight calls (up to %.0f s)", args.grace)
    health.enter_graceful_shutdown()
    await server.stop(args.grace)
    for task in background:
        task.cancel()
    if forwarder is not None:
        await forwarder.close()
    await service.close()
    audit.close()
    http.shutdown()
    log.info("stopped cleanly")
    return 0


def statistics_settings(args: argparse.Namespace) -> StatisticsSettings:
    """How tenants' evidence is weighed and synced (server/matching/statistics.py); a bad
    value raises ValueError, which main() prints as a usage error."""
    evidence = EvidenceSettings(prior_pairs=args.prior_pairs, traffic_share=args.traffic_share)
    return StatisticsSettings(evidence=evidence, sync_seconds=args.sync_seconds)


def store_options(args: argparse.Namespace) -> dict:
    """The backend's own settings (server/storage/__init__.py, open_store)."""
    if not str(args.gallery).startswith(("milvus://", "milvus-lite:")):
        return {"role": args.role} if args.role else {}
    return {
        "timeout": args.milvus_timeout,
        "consistency": args.milvus_consistency,
        "tail_refresh": args.store_refresh_seconds,
    }


async def _follow_store(service: RetrievalService, seconds: float) -> None:
    """Tenants and keys created or deleted through other replicas, every ``seconds``."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await service.refresh_tenants()
        except Exception as err:  # the store may be down for a while: keep serving
            log.warning("could not refresh tenants from the store: %s", err)


async def _reload(service: RetrievalService, device: str) -> None:
    try:
        done = await service.reload("", "", device)
        log.info("reloaded on SIGHUP: %s", done)
    except Exception as err:
        log.error("reload on SIGHUP failed: %s", err)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers > 1:
        from server.workers import run_workers

        return run_workers(args, list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Pillow logs oddities of hostile files at ERROR (e.g. a TIFF claiming 65535 samples
    # per pixel): the caller gets the refusal, and an attacker must not fill the log.
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    if not args.no_auth and args.api_keys is None:
        print(
            "error: pass --api-keys FILE, or --no-auth to run without authentication "
            "(local use only)",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(serve(args))
    except (ValueError, FileNotFoundError, OSError, RuntimeError, StatusError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
