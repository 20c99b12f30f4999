"""``python -m imagesets``: build the glyph dataset, print its statistics, draw a grid."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagesets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build", help="render the glyph dataset into the cache and print its statistics"
    )
    build.add_argument(
        "--tiny", action="store_true", help="the small glyphs-tiny variant used by tests"
    )
    build.add_argument("--limit", type=int, help="at most this many classes per (split, tenant)")
    build.add_argument(
        "--system-fonts", action="store_true", help="also use fonts under /usr/share/fonts"
    )
    build.add_argument("--rebuild", action="store_true", help="render again even if cached")
    grid = sub.add_parser("grid", help="save a PNG grid of test-split samples")
    grid.add_argument("--dataset", default="glyphs", help="dataset spec (default: glyphs)")
    grid.add_argument("--out", type=Path, default=Path("docs/glyphs_grid.png"))
    grid.add_argument("--classes", type=int, default=16, help="rows: one random class each")
    grid.add_argument("--per-class", type=int, default=16, help="columns: samples per class")
    args = parser.parse_args(argv)

    if args.command == "grid":
        _grid(args.dataset, args.out, args.classes, args.per_class)
        return 0
    from imagesets import TINY_LIMIT, glyphs

    cfg = glyphs.GlyphConfig(
        limit=TINY_LIMIT if args.tiny else args.limit, system_fonts=args.system_fonts
    )
    data = glyphs.load(cfg, rebuild=args.rebuild)
    stats = glyphs.statistics(data)
    stats["cache"] = {
        "path": str(glyphs.cache_path(cfg)),
        "mib": round(glyphs.cache_path(cfg).stat().st_size / 2**20, 1),
    }
    json.dump(stats, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
