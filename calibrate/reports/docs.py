"""Numbers the docs quote from a shipped asset, written from the asset itself.

A table typed by hand drifts from the file it describes: CALIBRATION.md's score
normalisation table once gave numbers that neither the shipped calibration nor the
demo produced. Here every such number has a renderer that reads the asset, and the
docs hold its output between marker comments, invisible once rendered::

    <!-- generated:targets-table -->
    | target FAR | ... |
    <!-- /generated -->

or inline, inside a sentence: ``from <!-- generated:x -->0.27x to 9.0x<!-- /generated -->``.

    python -m calibrate.reports.docs           # rewrite the blocks from the assets
    python -m calibrate.reports.docs --check   # exit 1 naming each block that differs

tests/test_docs_generated.py runs the check, so a doc and its asset cannot part ways
unnoticed: replace the asset, run the command, commit both.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = Path("embedding/assets/glyphnet.calibration.json")  # relative to the root
DOCS = (Path("README.md"), Path("docs/CALIBRATION.md"), Path("docs/CONSISTENCY.md"))
BLOCK = re.compile(
    r"<!-- generated:(?P<name>[a-z0-9-]+) -->(?P<body>.*?)<!-- /generated -->", re.DOTALL
)


# ----------------------------------------------------------------------- formatting
def sci(x: float, digits: int = 2) -> str:
    """3 significant digits in the docs' short form: 8.22e-4, not 8.22e-04."""
    mantissa, exponent = f"{x:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def far_name(a: float) -> str:
    """A target FAR as the docs name it: 1e-3."""
    mantissa, exponent = f"{a:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}" if mantissa != "1" else f"1e{int(exponent)}"


def ratio(x: float) -> str:
    """A FAR / target ratio: two decimals, 3 significant digits from 10 on (16x, 11.7)."""
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n" + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ the asset
@dataclass(frozen=True)
class Shipped:
    """The shipped calibration document, read as the docs quote it."""

    doc: dict

    def targets(self) -> list[dict]:
        """Measurable targets, tightest FAR first."""
        found = [t for t in self.doc["targets"] if t["measurable"]]
        return sorted(found, key=lambda t: t["target_far"])

    def target(self, far: float) -> dict:
        for t in self.targets():
            if abs(t["target_far"] - far) <= 1e-12:
                return t
        raise KeyError(f"the shipped calibration has no target FAR {far:g}")


def targets_table(s: Shipped) -> str:
    rows = []
    for t in s.targets():
        a, ci = t["target_far"], t.get("ci") or {}
        far_ci = ci.get("far")
        thr_ci = ci.get("threshold_similarity")
        rows.append(
            [
                far_name(a),
                f"{t['threshold']['similarity']:.5f} / {t['threshold']['distance']:.5f}",
                sci(t["achieved_far"], 4),
                f"{t['tar']:.4f}",
                f"[{sci(far_ci[0])}, {sci(far_ci[1])}]" if far_ci else "-",
                f"[{thr_ci[0]:.4f}, {thr_ci[1]:.4f}]" if thr_ci else "-",
            ]
        )
    header = ["target FAR", "threshold (similarity / distance)", "achieved FAR", "TAR"]
    header += ["95% CI FAR (class bootstrap)", "95% CI threshold"]
    return table(header, rows)


def tenants_table(s: Shipped, far: float = 1e-3) -> str:
    rows = []
    for d in s.target(far)["datasets"]:
        own = d["threshold"]["similarity"] if d.get("threshold") else None
        rows.append(
            [
                d["name"],
                sci(d["far"]),
                ratio(d["far_ratio"]),
                f"{d['frr']:.4f}",
                "-" if own is None else f"{own:.4f}",
                "-" if d.get("threshold_drift") is None else f"{d['threshold_drift']:+.4f}",
            ]
        )
    header = ["tenant", "FAR at global", "FAR ratio", "FRR at global", "own threshold", "drift"]
    return table(header, rows)


def _held_out(part: dict, far: float) -> str:
    low, high = part["ci"]
    return f"{ratio(part['far_ratio'])} [{ratio(low / far)}, {ratio(high / far)}]"


def heldout_table(s: Shipped, far: float = 1e-3) -> str:
    rows = [
        [
            d["name"],
            _held_out(d["held_out"]["raw"], far),
            _held_out(d["held_out"]["normalized"], far),
        ]
        for d in s.target(far)["datasets"]
        if d.get("held_out")
    ]
    header = ["tenant", "raw FAR / target [95% CI]", "tenant-tail FAR / target [95% CI]"]
    return table(header, rows)


def _ratios(t: dict, kind: str) -> list[float]:
    return [d["held_out"][kind]["far_ratio"] for d in t["datasets"] if d.get("held_out")]


def heldout_ranges(s: Shipped) -> str:
    rows = []
    for t in s.targets():
        raw, norm = _ratios(t, "raw"), _ratios(t, "normalized")
        at_global = [d["far_ratio"] for d in t["datasets"]]
        rows.append(
            [
                far_name(t["target_far"]),
                f"{ratio(min(at_global))}-{ratio(max(at_global))}",
                f"{ratio(min(raw))}-{ratio(max(raw))}",
                f"{ratio(min(norm))}-{ratio(max(norm))}",
            ]
        )
    header = ["target FAR", "all pairs, raw", "held-out, raw", "held-out, tenant-tail"]
    return table(header, rows)


def consistency(s: Shipped) -> str:
    c = s.doc["consistency"]
    low, high = c["similarity_range"]
    lo_far, hi_far = s.doc["settings"]["far_range"]
    return (
        f"Consistency over FAR {far_name(lo_far)}..{far_name(hi_far)} (similarity "
        f"{low:.4f}..{high:.4f}, {s.doc['settings']['grid_size']} thresholds): overall OPIS "
        f"{sci(c['overall']['opis'], 3)}, eps-OPIS {c['overall']['eps_opis']:.4f}; across "
        f"tenants OPIS {sci(c['cross_dataset']['opis'])}, eps-OPIS "
        f"{sci(c['cross_dataset']['eps_opis'])}."
    )


def spread(s: Shipped, far: float = 1e-3) -> str:
    """Inline: the raw per-tenant FAR range at the global threshold, as multiples."""
    ratios = [d["far_ratio"] for d in s.target(far)["datasets"]]
    return f"{ratio(min(ratios))}x to {ratio(max(ratios))}x"


def tar(s: Shipped, far: float = 1e-3) -> str:
    """Inline: TAR at the given target."""
    return f"TAR {s.target(far)['tar']:.3f} at FAR {far_name(far)}"


RENDERERS: dict[str, Callable[[Shipped], str]] = {
    "targets-table": targets_table,
    "tenants-table": tenants_table,
    "heldout-table": heldout_table,
    "heldout-ranges": heldout_ranges,
    "consistency": consistency,
    "tenant-spread": spread,
    "tar": tar,
}


# ------------------------------------------------------------------- the documents
@dataclass(frozen=True)
class Stale:
    doc: Path
    block: str
    want: str
    got: str

    def __str__(self) -> str:
        diff = difflib.unified_diff(
            self.got.splitlines(), self.want.splitlines(), "in the doc", "from the asset",
            lineterm="",
        )  # fmt: skip
        return f"{self.doc}: block {self.block!r} differs from {SHIPPED}:\n" + "\n".join(diff)


def load_shipped(root: Path = ROOT) -> Shipped:
    return Shipped(json.loads((root / SHIPPED).read_text()))


def render(text: str, shipped: Shipped, where: Path) -> tuple[str, list[Stale]]:
    """``text`` with every generated block rewritten, and the blocks that were stale."""
    stale: list[Stale] = []

    def fill(match: re.Match[str]) -> str:
        name, got = match["name"], match["body"]
        if name not in RENDERERS:
            raise KeyError(f"{where}: unknown generated block {name!r}; have {sorted(RENDERERS)}")
        want = RENDERERS[name](shipped)
        if want != got:
            stale.append(Stale(where, name, want, got))
        return f"<!-- generated:{name} -->{want}<!-- /generated -->"

    return BLOCK.sub(fill, text), stale


def update(root: Path = ROOT, check: bool = False, docs=DOCS) -> list[Stale]:
    """Rewrite (or with ``check`` only compare) the generated blocks of ``docs``."""
    shipped = load_shipped(root)
    stale: list[Stale] = []
    for doc in docs:
        text = (root / doc).read_text(encoding="utf-8")
        fresh, found = render(text, shipped, doc)
        stale += found
        if found and not check:
            (root / doc).write_text(fresh, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m calibrate.reports.docs",
        description="Write the docs' numbers that quote the shipped calibration from it.",
    )
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = p.parse_args(argv)
    stale = update(ROOT, check=args.check)
    for s in stale:
        print(s if args.check else f"updated {s.doc}: {s.block}", file=sys.stderr)
    if args.check and stale:
        print("run `python -m calibrate.reports.docs` and commit the docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
