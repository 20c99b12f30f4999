"""The leave-tenant-out consistency study: does one threshold give every tenant its FAR?

``python -m calibrate.studies.leave_tenant_out`` runs the protocol of docs/CONSISTENCY.md on
the glyph test tenants (or any labelled set with tenants) and writes the report whose
tables that page shows:

- every tenant's classes are split into three parts; in each rotation one part is its
  gallery (normalisation statistics), one the oracle's labelled calibration set, one
  is evaluated (calibrate/heldout/holdout.py);
- the global threshold for a tenant is calibrated on the *other* tenants' evaluated
  pairs (leave-tenant-out), in the method's own score space;
- the noise floor is the oracle: a per-tenant threshold from labelled classes of the
  same tenant that are neither gallery nor evaluated;
- statistics are averaged over ``splits`` random class splits, with class-bootstrap
  intervals (classes resampled within tenants, thresholds held fixed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from calibrate.consistency import eps_opis, opis, utility
from calibrate.engine.grids import GridCounts
from calibrate.heldout.holdout import (
    Part,
    Scored,
    accepted,
    part_pairs,
    per_class,
    pooled_histogram,
    rotations,
    split_classes,
    subsample,
    tail_maps,
    threshold_at,
)
from calibrate.studies.outcomes import (
    FLOOR,
    GOAL_TARGETS,
    METHODS,
    Outcome,
    SplitResult,
    StudyResult,
    StudySettings,
)
from imagesets import EmbeddingSet
from scorenorm import Cohort, TailSettings, gallery_histogram
from scorenorm.evidence import EvidenceSettings, Survival, traffic_survival
from scorenorm.pairs import BLOCK, scores
from scorenorm.tail_map import deployment_maps
from scorenorm.traffic import TrafficTail, null_maxima

OPIS_RANGE = (1e-4, 1e-2)
GRID = 101
MAX_TRAFFIC_QUERIES = 2000  # served queries per tenant and rotation in the simulation


# ------------------------------------------------------------------ one split
class _Split:
    """Pairs of every part of every tenant for one random class split."""

    def __init__(self, emb: EmbeddingSet, s: StudySettings, rng: np.random.Generator) -> None:
        self.x = np.ascontiguousarray(emb.embeddings, dtype=np.float32)
        self.labels = np.asarray(emb.labels)
        self.n_classes = len(emb.class_names)
        self.tenants = len(emb.tenant_names)
        self.settings = s
        self.class_tenant = np.full(self.n_classes, -1)
        self.class_tenant[self.labels] = emb.tenants
        self.rows = split_classes(self.labels, np.asarray(emb.tenants), s.parts, rng)
        self.parts: list[list[Part]] = [
            [part_pairs(self.x, self.labels, r, self.n_classes, k) for r in rows]
            for k, rows in enumerate(self.rows)
        ]

    def evaluated(self, e: int) -> list[Scored]:
        return [self.parts[k][e].pairs for k in range(self.tenants)]

    # -- the methods: per left-out tenant, its evaluated pairs in the method's space and
    #    the threshold calibrated on the other tenants in that space.
    def raw(self, e: int, a: float) -> list[tuple[Scored, float | None]]:
        ev = self.evaluated(e)
        return [(ev[k], _lto_threshold(ev, k, a)) for k in range(self.tenants)]

    def oracle(self, c: int, e: int, a: float) -> list[tuple[Scored, float | None]]:
        out = []
        for k in range(self.tenants):
            cal = self.parts[k][c].pairs
            out.append((self.parts[k][e].pairs, threshold_at(cal.imp, cal.imp_total, a)))
        return out

    def tenant_tail(self, g: int, e: int, targets: Sequence[float]):
        """{target: [(mapped pairs, threshold)]}: maps onto the others' pooled tail."""
        ev = self.evaluated(e)
        galleries = [self.parts[k][g].hist for k in range(self.tenants)]
        out: dict[float, list] = {a: [] for a in targets}
        for k in range(self.tenants):
            others = pooled_histogram(
                [self.parts[j][e].hist for j in range(self.tenants) if j != k]
            )
            maps = tail_maps(galleries, others, self.settings.tail)
            mapped = [ev[j].mapped(maps[j]) for j in range(self.tenants)]
            for a in targets:
                out[a].append((mapped[k], _lto_threshold(mapped, k, a)))
        return out

    def as_norm(self, g: int, e: int) -> list[Scored]:
        """Each tenant's evaluated pairs, AS-normed with its gallery part as cohort."""
        out = []
        for k in range(self.tenants):
            gal, ev = self.parts[k][g], self.parts[k][e]
            cohort = Cohort(self.x[gal.rows], self.labels[gal.rows], self.settings.as_norm_top_k)
            out.append(_as_normed(self.x, self.labels, ev, cohort))
        return out


def _lto_threshold(scored: Sequence[Scored], k: int, a: float) -> float | None:
    """t*(a) on the pooled impostor pairs of every tenant but ``k``."""
    others = [s for j, s in enumerate(scored) if j != k]
    values = np.concatenate([s.imp for s in others])
    return threshold_at(values, sum(s.imp_total for s in others), a)


def _as_normed(x: np.ndarray, labels: np.ndarray, part: Part, cohort: Cohort) -> Scored:
    """All pairs of the part AS-normed; the top KEEP share of impostors kept explicitly."""
    from calibrate.heldout.holdout import KEEP_LEVEL

    rows = part.rows
    lab = labels[rows]
    stats = cohort.stats(x[rows])
    imp, ia, ib, gen, gc = [], [], [], [], []
    n = len(rows)
    for i0 in range(0, n, BLOCK):
        s = scores(x[rows[i0 : i0 + BLOCK]], x[rows])
        i = np.arange(i0, min(i0 + BLOCK, n))
        z = 0.5 * (
            (s - stats.mean[i, None]) / stats.sd[i, None]
            + (s - stats.mean[None, :]) / stats.sd[None, :]
        )
        upper = np.arange(n)[None, :] > i[:, None]
        same = lab[i, None] == lab[None, :]
        r, q = np.nonzero(upper & ~same)
        imp.append(z[r, q].astype(np.float32))
        ia.append(lab[i0 + r])
        ib.append(lab[q])
        r, q = np.nonzero(upper & same)
        gen.append(z[r, q])
        gc.append(lab[i0 + r])
    imp_all = np.concatenate(imp)
    keep_n = max(1, math.ceil(KEEP_LEVEL * len(imp_all)))
    keep = np.argpartition(-imp_all, keep_n - 1)[:keep_n]
    return Scored(
        imp_all[keep],
        np.concatenate(ia)[keep],
        np.concatenate(ib)[keep],
        len(imp_all),
        np.concatenate(gen),
        np.concatenate(gc),
    )


def _tally(results: list[list[tuple[Scored, float | None]]], sp: _Split) -> Outcome:
    """Pool the counts of every rotation (each a list of (pairs, threshold) per tenant)."""
    t_n, c_n = sp.tenants, sp.n_classes
    out = Outcome(
        np.zeros(t_n), np.zeros(t_n), np.zeros(t_n), np.zeros(t_n), np.zeros(c_n), np.zeros(c_n)
    )
    for rot in results:
        for k, (scored, t) in enumerate(rot):
            out.pairs[k] += scored.imp_total
            out.gen_pairs[k] += len(scored.gen)
            if t is None:  # unmeasurable: nothing is accepted, and the row says so
                out.acc[k] = np.nan
                continue
            out.acc[k] += accepted(scored.imp, t)
            out.gen_acc[k] += accepted(scored.gen, t)
            out.class_acc += per_class(scored.imp, scored.imp_a, scored.imp_b, t, c_n)
    return out


def _class_pairs(sp: _Split, e_of_rotation: list[int]) -> np.ndarray:
    total = np.zeros(sp.n_classes)
    for e in e_of_rotation:
        for k in range(sp.tenants):
            total += sp.parts[k][e].class_impostors
    return total


def _raw_tar_at_far(sp: _Split, far: float) -> float:
    """Pooled raw TAR at the single raw threshold whose pooled FAR is ``far`` (in-sample)."""
    ev = [p.pairs for parts in sp.parts for p in parts]
    imp = np.concatenate([s.imp for s in ev])
    t = threshold_at(imp, sum(s.imp_total for s in ev), far)
    gen = np.concatenate([s.gen for s in ev])
    return float("nan") if t is None else accepted(gen, t) / len(gen)


def run_split(emb: EmbeddingSet, s: StudySettings, split: int) -> SplitResult:
    rng = np.random.default_rng([s.seed, split])
    sp = _Split(emb, s, rng)
    rots = rotations(s.parts)
    per: dict[tuple[str, float], list] = {}
    opis_pairs: dict[str, list[list[Scored]]] = {}
    for g, c, e in rots:
        for a in s.targets:
            per.setdefault(("raw", a), []).append(sp.raw(e, a))
            per.setdefault((FLOOR, a), []).append(sp.oracle(c, e, a))
        if "tenant-tail" in s.methods:
            for a, rot in sp.tenant_tail(g, e, s.targets).items():
                per.setdefault(("tenant-tail", a), []).append(rot)
            opis_pairs.setdefault("tenant-tail", []).append(_mapped_all(sp, g, e))
        if "as-norm" in s.methods:
            normed = sp.as_norm(g, e)
            for a in s.targets:
                per.setdefault(("as-norm", a), []).append(
                    [(normed[k], _lto_threshold(normed, k, a)) for k in range(sp.tenants)]
                )
            opis_pairs.setdefault("as-norm", []).append(normed)
        opis_pairs.setdefault("raw", []).append(sp.evaluated(e))
    class_pairs = _class_pairs(sp, [e for _, _, e in rots])
    outcomes = {}
    for key, results in per.items():
        o = _tally(results, sp)
        o.class_pairs = class_pairs
        pooled_far = np.nansum(o.acc) / o.pairs.sum()
        o.tar_at_equal_far = _raw_tar_at_far(sp, pooled_far) if pooled_far > 0 else float("nan")
        outcomes[key] = o
    opis_stats = {m: _opis(sp, pairs) for m, pairs in opis_pairs.items()}
    sizes = _gallery_sizes(sp, s, rots, rng) if "tenant-tail" in s.methods else {}
    return SplitResult(outcomes, opis_stats, sizes)


def _mapped_all(sp: _Split, g: int, e: int) -> list[Scored]:
    """Every tenant mapped onto the pooled tail of all tenants (no one left out): OPIS."""
    ev = sp.evaluated(e)
    pooled = pooled_histogram([sp.parts[k][e].hist for k in range(sp.tenants)])
    maps = tail_maps([sp.parts[k][g].hist for k in range(sp.tenants)], pooled, sp.settings.tail)
    return [ev[k].mapped(maps[k]) for k in range(sp.tenants)]


def _opis(sp: _Split, rotations_pairs: list[list[Scored]]) -> dict[str, float]:
    """Class OPIS, eps-OPIS and cross-tenant OPIS of the evaluated pairs in one score
    space, over the pooled range where FAR runs from 1e-2 to 1e-4."""
    flat = [s for rot in rotations_pairs for s in rot]
    imp = np.concatenate([s.imp for s in flat])
    total = sum(s.imp_total for s in flat)
    lo, hi = threshold_at(imp, total, OPIS_RANGE[1]), threshold_at(imp, total, OPIS_RANGE[0])
    if lo is None or hi is None:
        return {"opis": float("nan"), "eps_opis": float("nan"), "cross_tenant_opis": float("nan")}
    grid = np.linspace(lo, hi, GRID)
    class_ds = sp.class_tenant.copy()
    imp_counts = GridCounts([grid] * sp.tenants, np.maximum(class_ds, 0))
    gen_counts = GridCounts([grid] * sp.tenants, np.maximum(class_ds, 0))
    for rot in rotations_pairs:
        for k, s in enumerate(rot):
            imp_counts.add(k, s.imp, s.imp_a)
            imp_counts.add(k, s.imp, s.imp_b)
            gen_counts.add(k, s.gen, s.gen_class)
    sizes = np.bincount(sp.labels, minlength=sp.n_classes).astype(float)
    class_imp = _class_pairs(sp, [e for _, _, e in rotations(sp.settings.parts)])
    usable = (sizes >= 2) & (class_imp > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tar = gen_counts.at_least()[usable] / (sizes[usable] * (sizes[usable] - 1) / 2)[:, None]
        far = imp_counts.at_least()[usable] / class_imp[usable][:, None]
    u = utility(tar, far)
    t_imp = np.zeros((sp.tenants, GRID))
    t_gen = np.zeros((sp.tenants, GRID))
    t_imp_total = np.zeros(sp.tenants)
    t_gen_total = np.zeros(sp.tenants)
    for c in np.flatnonzero(usable):
        k = class_ds[c]
        t_imp[k] += imp_counts.at_least()[c]
        t_gen[k] += gen_counts.at_least()[c]
        t_imp_total[k] += class_imp[c]
        t_gen_total[k] += sizes[c] * (sizes[c] - 1) / 2
    tu = utility(t_gen / t_gen_total[:, None], t_imp / t_imp_total[:, None])
    return {"opis": opis(u), "eps_opis": eps_opis(u), "cross_tenant_opis": opis(tu)}


def _gallery_sizes(sp: _Split, s: StudySettings, rots, rng) -> dict:
    """Tenant-tail with galleries of n random items: how big must a gallery be, and how
    much does served traffic (the evaluated part's queries, label-free) add?

    Keys (n, target, source) with source "gallery" (gallery pairs only) or "traffic"
    (with the traffic evidence of scorenorm.traffic, weighed as the server weighs it).
    """
    out = {}
    for n in s.gallery_sizes:
        picks = {
            g: [subsample(sp.parts[k][g].rows, n, rng) for k in range(sp.tenants)]
            for g, _, _ in rots
        }
        hists = {
            g: [gallery_histogram(sp.x[p], sp.labels[p]) for p in picks[g]] for g, _, _ in rots
        }
        flows = {g: _traffic(sp, picks[g], e, rng) for g, _, e in rots}
        for source, traffic in (("gallery", None), ("traffic", flows)):
            for a in (t for t in s.targets if t in GOAL_TARGETS):
                out[(n, a, source)] = _sized(sp, s, rots, hists, traffic, a)
    return out


def _traffic(sp: _Split, picks, e: int, rng) -> list[Survival | None]:
    """Each tenant's traffic evidence: its evaluated part's queries served against its
    gallery picks, fitted without their labels (scorenorm.traffic)."""
    out = []
    for k, pick in enumerate(picks):
        queries = sp.parts[k][e].rows
        if len(queries) > MAX_TRAFFIC_QUERIES:
            queries = rng.choice(queries, MAX_TRAFFIC_QUERIES, replace=False)
        tail = TrafficTail()
        tail.add_scores(scores(sp.x[queries], sp.x[pick]), sp.labels[pick])
        fit = tail.fit(null_maxima(sp.x[pick], sp.labels[pick]))
        out.append(traffic_survival(fit, EvidenceSettings()))
    return out


def _sized(sp: _Split, s: StudySettings, rots, galleries: dict, traffic, a: float):
    """Per tenant accepted and total impostor pairs, and the active maps, with the
    given gallery histograms and traffic (leave-tenant-out thresholds, as in the main
    study; the maps built as the server builds them)."""
    acc = np.zeros(sp.tenants)
    pairs = np.zeros(sp.tenants)
    active = 0
    for g, _, e in rots:
        ev = sp.evaluated(e)
        for k in range(sp.tenants):
            others = pooled_histogram([sp.parts[j][e].hist for j in range(sp.tenants) if j != k])
            flows = traffic[g] if traffic else None
            maps = deployment_maps(galleries[g], others, s.tail, traffic=flows)
            mapped = [ev[j].mapped(maps[j]) for j in range(sp.tenants)]
            t = _lto_threshold(mapped, k, a)
            acc[k] += 0 if t is None else accepted(mapped[k].imp, t)
            pairs[k] += ev[k].imp_total
            active += maps[k].active
    return acc, pairs, active


def run_study(emb: EmbeddingSet, settings: StudySettings, progress: bool = True) -> StudyResult:
    started = time.perf_counter()
    splits = []
    for i in range(settings.splits):
        t0 = time.perf_counter()
        splits.append(run_split(emb, settings, i))
        if progress:
            took = time.perf_counter() - t0
            print(f"  {emb.name}: split {i + 1}/{settings.splits} in {took:.0f} s", file=sys.stderr)
    class_tenant = np.full(len(emb.class_names), -1)
    class_tenant[emb.labels] = emb.tenants
    return StudyResult(
        emb.name,
        list(emb.tenant_names),
        settings,
        splits,
        class_tenant,
        time.perf_counter() - started,
    )


# ------------------------------------------------------------------ command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m calibrate.studies.leave_tenant_out",
        description="Leave-tenant-out study of one global threshold across tenants: per-tenant "
        "FAR raw, normalised and with a labelled per-tenant oracle (the noise floor), averaged "
        "over random class splits (docs/CONSISTENCY.md).",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]PATH.onnx",
        help="embedder to study, repeatable (default: the shipped default embedder)",
    )
    p.add_argument("--dataset", default="glyphs", help="labelled set with tenants (default glyphs)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--target-far", default="1e-2,1e-3,1e-4", help="comma-separated target FARs")
    p.add_argument("--splits", type=int, default=5, help="random class splits (default 5)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated of {METHODS}")
    p.add_argument("--bootstrap", type=int, default=200, help="class-bootstrap draws")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gallery-sizes",
        default="25,50,100,200,400,800",
        help="gallery sizes for the sample-size table ('' to skip)",
    )
    p.add_argument("--out", type=Path, default=Path("out/consistency"), help="report folder")
    return p


def main(argv: list[str] | None = None) -> int:
    from calibrate.inputs import InputError, embedded, model_file
    from calibrate.studies.consistency_report import figure, markdown

    args = parser().parse_args(argv)
    try:
        settings = _settings(args)
        results = []
        for name, path in _models(args.model):
            model = model_file(path)
            emb = embedded(args.dataset, args.split, model, "cpu", True)
            emb = replace(emb, name=name)
            results.append(run_study(emb, settings))
    except (InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = "python -m calibrate.studies.leave_tenant_out " + " ".join(argv or sys.argv[1:])
    text = markdown(results, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text + "\n![per-tenant FAR](per_tenant_far.png)\n")
    (args.out / "per_tenant_far.png").write_bytes(figure(results))
    print(text)
    print(f"\nwrote {args.out / 'report.md'}, {args.out / 'per_tenant_far.png'}")
    return 0


def _settings(args: argparse.Namespace) -> StudySettings:
    targets = tuple(float(v) for v in args.target_far.split(","))
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if "raw" not in methods:
        methods = ("raw", *methods)
    if args.splits < 1:
        raise ValueError("--splits must be >= 1")
    sizes = tuple(int(v) for v in args.gallery_sizes.split(",") if v)
    tail = TailSettings(top_level=min(0.5, 2 * max(targets)))
    return StudySettings(
        targets=targets,
        splits=args.splits,
        seed=args.seed,
        methods=methods,
        tail=tail,
        bootstrap=args.bootstrap,
        gallery_sizes=sizes,
    )


def _models(specs: list[str] | None) -> list[tuple[str, str | None]]:
    if not specs:
        return [("shipped", None)]
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        out.append((name, path) if sep else (Path(spec).stem, spec))
    return out


if __name__ == "__main__":
    sys.exit(main())
