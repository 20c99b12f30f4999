"""``python -m imagesets``: build a rendered dataset and print its statistics, draw a grid,
export any dataset as image folders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

_EXPORT_HELP = """\
Write DIR/<tenant>/<label>/<n>.png: enrol a tenant with
`python -m client enroll TENANT DIR/TENANT` (labels are the folder names, item ids
<label>/<n>.png) or read it back with imagesets.load_images("DIR").

Label folders are the class names made safe: '%', path separators, the characters
<>:"|?* , non-printable characters and a trailing space or dot become %XX (UTF-8
bytes, as in a URL), e.g. "U+002F /" -> "U+002F %2F"; everything else, spaces and
non-ASCII letters included, stays readable. imagesets.export.unescape reverses it.
<n> counts a class's images from 0 in dataset order, zero-padded.

exit codes:
  0  written
  1  the dataset could not be read, or the files could not be written
  2  bad arguments (unknown --tenant, --limit below 1, ...)
  3  DIR exists and is not an empty folder (pass --force to write into it anyway)
"""


def _grid(spec: str, out: Path, classes: int, per_class: int) -> None:
    from PIL import Image

    from imagesets import load_images

    images = load_images(spec, "test")
    rng = np.random.default_rng(0)
    picked = rng.choice(
        len(images.class_names), size=min(classes, len(images.class_names)), replace=False
    )
    rows = []
    for label in sorted(picked):
        idx = np.flatnonzero(images.labels == label)[:per_class]
        tiles = [images.image(i) for i in idx]
        blank = np.full_like(tiles[0], 255)
        rows.append(np.concatenate(tiles + [blank] * (per_class - len(tiles)), axis=1))
    grid = np.concatenate(rows, axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out)
    print(f"wrote {out}")


def _build(args: argparse.Namespace) -> int:
    """Render (or read from the cache) one rendered set and print its statistics as JSON."""
    from imagesets import TINY_LIMIT, glyphs, novel

    spec = args.dataset
    if args.tiny and not spec.endswith("-tiny"):
        spec += "-tiny"
    if spec.startswith("novel"):
        if args.system_fonts:
            print("--system-fonts applies to the glyph sets only", file=sys.stderr)
            return 2
        limit = novel.TINY_LIMIT if spec == "novel-tiny" else args.limit
        ncfg = novel.NovelConfig(limit=limit)
        stats = novel.statistics(novel.load(ncfg, rebuild=args.rebuild))
        path = novel.cache_path(ncfg)
    else:
        limit = TINY_LIMIT if spec == "glyphs-tiny" else args.limit
        gcfg = glyphs.GlyphConfig(limit=limit, system_fonts=args.system_fonts)
        stats = glyphs.statistics(glyphs.load(gcfg, rebuild=args.rebuild))
        path = glyphs.cache_path(gcfg)
    stats["cache"] = {"path": str(path), "mib": round(path.stat().st_size / 2**20, 1)}
    json.dump(stats, sys.stdout, indent=2)
    print()
    return 0


def _progress(enabled: bool):
    """A bar on stderr when it is a terminal and not silenced (contracts.progress)."""
    from contracts import progress

    if not progress.enabled(enabled):
        return None
    return lambda rows, total: progress.bar(rows, total=total, unit="img")


def _export(args: argparse.Namespace) -> int:
    from imagesets import load_images
    from imagesets.export import ExportError, export

    out: Path = args.dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        what = "a file" if not out.is_dir() else "a folder that is not empty"
        print(f"export: {out} is {what}; choose a new DIR or pass --force", file=sys.stderr)
        return 3
    for flag, value, least in (("--limit", args.limit, 1), ("--per-class", args.per_class, 1)):
        if value is not None and value < least:
            print(f"export: {flag} must be at least {least}, got {value}", file=sys.stderr)
            return 2
    if args.skip < 0:
        print(f"export: --skip must be at least 0, got {args.skip}", file=sys.stderr)
        return 2
    try:
        images = load_images(args.name, args.split)
    except (OSError, ValueError, KeyError) as err:
        print(f"export: cannot read dataset {args.name!r} ({args.split}): {err}", file=sys.stderr)
        return 1
    try:
        done = export(
            images,
            out,
            args.tenant,
            args.limit,
            args.seed,
            _progress(args.progress),
            args.per_class,
            args.skip,
        )
    except ExportError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"export: cannot write {out}: {err}", file=sys.stderr)
        return 1
    for tenant, (classes, count) in done.tenants.items():
        print(f"{tenant}: {classes} classes, {count} images")
    print(f"wrote {done.images} images to {out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from imagesets import RENDERED

    parser = argparse.ArgumentParser(prog="python -m imagesets", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar, the rendering's included (bars show only on a terminal)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build", help="render a dataset into the cache and print its statistics", parents=[common]
    )
    build.add_argument(
        "--dataset",
        default="glyphs",
        choices=RENDERED,
        help="which rendered set (default: glyphs; novel is the out-of-domain set)",
    )
    build.add_argument(
        "--tiny", action="store_true", help="its small -tiny variant (the one tests use)"
    )
    build.add_argument(
        "--limit", type=int, help="at most this many classes per (split, tenant), or per tenant"
    )
    build.add_argument(
        "--system-fonts", action="store_true", help="glyphs: also use fonts under /usr/share/fonts"
    )
    build.add_argument("--rebuild", action="store_true", help="render again even if cached")
    grid = sub.add_parser("grid", help="save a PNG grid of test-split samples", parents=[common])
    grid.add_argument("--dataset", default="glyphs", help="dataset spec (default: glyphs)")
    grid.add_argument("--out", type=Path, default=Path("docs/glyphs_grid.png"))
    grid.add_argument("--classes", type=int, default=16, help="rows: one random class each")
    grid.add_argument("--per-class", type=int, default=16, help="columns: samples per class")
    exp = sub.add_parser(
        "export",
        help="write a dataset as DIR/<tenant>/<label>/<n>.png for `python -m client enroll`",
        description=_EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    exp.add_argument(
        "name", metavar="NAME", help="dataset spec: glyphs, glyphs-tiny, novel, a folder, ..."
    )
    exp.add_argument("split", metavar="SPLIT", choices=("train", "test"), help="train or test")
    exp.add_argument("dir", metavar="DIR", type=Path, help="output folder (new or empty)")
    exp.add_argument(
        "--tenant",
        metavar="T",
        action="append",
        help="only this tenant (repeat for several; default: all)",
    )
    exp.add_argument(
        "--limit",
        metavar="N",
        type=int,
        help="at most N classes per tenant (a seeded sample, see --seed)",
    )
    exp.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    exp.add_argument(
        "--per-class",
        metavar="N",
        type=int,
        help="at most N images per class (after --skip): e.g. a gallery of 5 per class",
    )
    exp.add_argument(
        "--skip",
        metavar="K",
        type=int,
        default=0,
        help="leave out each class's first K images: e.g. queries that are not in a "
        "gallery exported with --per-class K",
    )
    exp.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty DIR: same names are overwritten, other files stay",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.progress:
        from contracts.progress import silence

        silence()  # also the bar of rendering the dataset, when it is not cached yet
    if args.command == "grid":
        _grid(args.dataset, args.out, args.classes, args.per_class)
        return 0
    if args.command == "export":
        return _export(args)
    return _build(args)


if __name__ == "__main__":
    raise SystemExit(main())
