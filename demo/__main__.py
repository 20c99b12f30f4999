"""``python -m demo``: the whole path on the embedded glyph data, end to end.

calibrate the default model -> start the gRPC server -> enrol tenants -> send genuine
and impostor queries with feedback -> read the live FAR the server exports, and
(optionally) train first, compare baseline and TCM, or have a real Prometheus scrape it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import grpc

from demo.config import DemoConfig
from demo.pipeline import run

DEFAULT_TENANTS = ("latin", "greek", "cyrillic", "math")
OUT, TINY_OUT = Path("out/demo"), Path("out/demo-tiny")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (None, an off switch):
    "(default: the shipped model) (default: None)" says nothing twice."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description=(
            "Run the product end to end on the embedded glyph data: calibrate, serve, "
            "enrol tenants, send genuine and impostor queries, and report the live "
            "per-tenant FAR the server exports."
        ),
        formatter_class=_Help,
    )
    parser.add_argument("--target-far", type=float, default=1e-3, help="FAR to serve at")
    parser.add_argument("--model", type=Path, help="ONNX embedder (default: the shipped model)")
    parser.add_argument(
        "--tenants", default=",".join(DEFAULT_TENANTS), help="comma-separated glyph script groups"
    )
    parser.add_argument(
        "--enrolled",
        type=int,
        default=100,
        help="classes enrolled per tenant (at most 60%% of its classes)",
    )
    parser.add_argument(
        "--gallery-per-class",
        type=int,
        default=5,
        help="gallery images per enrolled class (enough pairs for score normalisation)",
    )
    parser.add_argument(
        "--impostor-per-class", type=int, default=3, help="queries per never-enrolled class"
    )
    parser.add_argument(
        "--genuine-per-class", type=int, default=2, help="genuine queries per enrolled class"
    )
    parser.add_argument(
        "--impostor-classes", type=int, default=60, help="never-enrolled classes queried per tenant"
    )
    parser.add_argument(
        "--out", type=Path, help=f"output folder (default: {OUT}; with --tiny {TINY_OUT})"
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to embed"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the tenants' plans")
    parser.add_argument(
        "--tiny", action="store_true", help="glyphs-tiny and few queries: a smoke run in seconds"
    )
    parser.add_argument("--train", action="store_true", help="train a TCM model first and use it")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also train a baseline and a TCM model on the same budget and compare them",
    )
    parser.add_argument(
        "--compare-steps",
        type=int,
        default=400,
        help="training steps of each --compare run (0: the full config)",
    )
    parser.add_argument(
        "--prometheus",
        action="store_true",
        help="start a real Prometheus (needs /usr/bin/prometheus) scraping the server",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep the server (and Prometheus) running after the report until Ctrl-C",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar in any step (they show only on a terminal anyway)",
    )
    args = parser.parse_args(argv)
    if args.no_progress:
        from contracts.progress import silence

        silence()  # the steps run as processes: the environment carries it to them
    if not 0.0 < args.target_far < 1.0:
        parser.error(f"--target-far must be in (0, 1), got {args.target_far}")
    tenants = tuple(t.strip() for t in args.tenants.split(",") if t.strip())
    if not tenants:
        parser.error("--tenants names no tenant")
    return DemoConfig(
        target_far=args.target_far,
        model=args.model,
        tenants=tenants,
        enrolled=2 if args.tiny else args.enrolled,
        gallery_per_class=args.gallery_per_class,
        genuine_per_class=args.genuine_per_class,
        impostor_classes=3 if args.tiny else args.impostor_classes,
        impostor_per_class=args.impostor_per_class,
        out=args.out or (TINY_OUT if args.tiny else OUT),
        device=args.device,
        seed=args.seed,
        tiny=args.tiny,
        train=args.train,
        compare=args.compare,
        compare_steps=args.compare_steps,
        prometheus=args.prometheus,
        serve=args.serve,
    )


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both unwind through the cleanup that stops every child.

    A shell starts background jobs with SIGINT ignored and Python then keeps it ignored,
    and SIGTERM would end the demo without unwinding at all: either way the children,
    which run in their own sessions, would be left behind.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    _stop_on_signals()
    try:
        return run(config)
    except KeyboardInterrupt:
        print("\ndemo: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    except grpc.RpcError as err:  # an expected status: say which, not a traceback
        print(f"demo: the server answered {err.code().name}: {err.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
