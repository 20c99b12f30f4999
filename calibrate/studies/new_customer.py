"""The new-customer study: small tenants from data the embedder and calibration never saw.

``python -m calibrate.studies.new_customer`` plays the first days of a new customer through
the server's own decision statistics (scorenorm) and reports what docs/CONSISTENCY.md,
"New customers", shows:

- every tenant enrols **one image of each of 13-80 identities** (``identities``);
- it is then served a few hundred **unlabelled warm-up queries**, a mix of genuine
  queries (another image of an enrolled identity) and impostors (identities of the same
  tenant that are not enrolled), and nobody gives feedback;
- then come the **evaluated queries**: impostors (for the per-pair FAR at each target)
  and genuine ones (for TAR), decided at the threshold the tenant is served after its
  warm-up;
- the **noise floor** is the oracle: a per-tenant threshold calibrated with labels on
  other identities of the same tenant (one enrolment image each, their other images as
  queries), so it sees the same pair structure with the same sample sizes;
- all tenants of a split form one deployment (the prior pools them).

Methods, each a threshold per tenant and target: ``raw`` (the global threshold as is),
``before`` (the server before the new-customer work: gallery pairs plus sampled query
pairs that leave out the matched identity, capped at half the evidence, identity map
below 1,500 pairs), ``tenant-tail`` (this version: scorenorm.traffic + scorenorm.evidence)
and the ``oracle``. The live monitor is judged too: its label-free FAR over the
tenant's traffic (warm-up and evaluated queries) against the true FAR of those pairs,
before (counts that leave out each query's rank-1 item) and after (scorenorm.traffic).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from calibrate.heldout.holdout import accepted, threshold_at
from contracts import CalibrationDoc
from imagesets import EmbeddingSet
from scorenorm import ScoreHistogram, TailSettings, build_map, gallery_histogram, scores
from scorenorm.evidence import EvidenceSettings, traffic_survival
from scorenorm.histogram import NBINS, bin_of, mix
from scorenorm.tail_map import deployment_maps
from scorenorm.traffic import FISHER, Null, TrafficTail, null_maxima, residual

METHODS = ("raw", "before", "tenant-tail", "oracle")
FLOOR = "oracle"
GOAL_POOLED = (0.8, 1.25)
GOAL_STD = 1.25
MONITOR_MIN_EXCEEDANCES = 10
MONITOR_FACTOR = 2.0
MONITOR_POOLED = (0.67, 1.5)
BEFORE_SAMPLES = 32  # members the server sampled per observed query before this change
BEFORE_WEIGHT = 0.5
BEFORE_DEFAULT = 1e-3  # the served default target whose match decided what a sample left out


@dataclass(frozen=True)
class CustomerSettings:
    targets: tuple[float, ...] = (1e-2, 1e-3)
    splits: int = 5
    seed: int = 0
    identities: tuple[int, int] = (13, 80)
    warmup: tuple[int, int] = (200, 500)
    genuine_share: tuple[float, float] = (0.3, 0.7)
    eval_impostors: int = 1000
    eval_genuine: int = 300
    oracle_queries: int = 3000
    tail: TailSettings = field(default_factory=TailSettings)
    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)


@dataclass
class TenantOutcome:
    """One tenant in one split: per (method, target) accepted and total pairs."""

    tenant: str
    split: int
    identities: int
    warmup: int
    impostor: dict[tuple[str, float], tuple[int, int]]
    genuine: dict[tuple[str, float], tuple[int, int]]
    monitor: dict[float, dict[str, float]]  # target -> truth, exceedances, before, after


# ------------------------------------------------------------------ one tenant's data
@dataclass
class _Tenant:
    name: str
    gallery: np.ndarray  # rows, one per identity
    gallery_ids: np.ndarray
    warm: np.ndarray  # query x item scores, unlabelled
    warm_impostor: np.ndarray  # query x item: True where the pair is an impostor pair
    eval_imp: np.ndarray  # impostor query x item scores
    eval_gen: np.ndarray  # genuine scores (one per genuine query)
    oracle: np.ndarray  # impostor pair scores of the oracle's labelled set
    hist: ScoreHistogram  # gallery pairs
    traffic: TrafficTail
    null: Null  # the gallery items' own rank-1 scores (scorenorm.traffic)


def _tenant(
    emb: EmbeddingSet, k: int, s: CustomerSettings, rng: np.random.Generator
) -> _Tenant | None:
    x, labels = emb.embeddings, np.asarray(emb.labels)
    rows = np.flatnonzero(np.asarray(emb.tenants) == k)
    classes = np.unique(labels[rows])
    rng.shuffle(classes)
    n = int(min(rng.integers(s.identities[0], s.identities[1] + 1), len(classes) // 3))
    if n < 2:
        return None
    enrolled, rest = classes[:n], classes[n:]
    impostors, oracle = rest[: len(rest) // 2], rest[len(rest) // 2 :]
    by_class = {c: rows[labels[rows] == c] for c in classes}
    gallery = np.array([rng.choice(by_class[c]) for c in enrolled])
    others = {c: np.setdiff1d(by_class[c], gallery) for c in enrolled}
    genuine_ok = [c for c in enrolled if len(others[c])]

    def queries(count: int, share: float) -> tuple[np.ndarray, np.ndarray]:
        genuine = rng.random(count) < share if genuine_ok else np.zeros(count, bool)
        picked = [
            rng.choice(others[rng.choice(genuine_ok)])
            if g
            else rng.choice(by_class[rng.choice(impostors)])
            for g in genuine
        ]
        out = np.array(picked, np.int64)
        return out, labels[out]

    warm, warm_labels = queries(
        int(rng.integers(s.warmup[0], s.warmup[1] + 1)), rng.uniform(*s.genuine_share)
    )
    imp, _ = queries(s.eval_impostors, 0.0)
    gen, gen_labels = (
        queries(s.eval_genuine, 1.0) if genuine_ok else (np.zeros(0, np.int64), np.zeros(0))
    )
    warm_scores = scores(x[warm], x[gallery])
    traffic = TrafficTail()
    traffic.add_scores(warm_scores)
    gen_scores = scores(x[gen], x[gallery])
    col = {c: j for j, c in enumerate(enrolled)}
    genuine_pairs = (
        gen_scores[np.arange(len(gen)), [col[c] for c in gen_labels]] if len(gen) else np.zeros(0)
    )
    return _Tenant(
        emb.tenant_names[k],
        gallery,
        enrolled,
        warm_scores,
        warm_labels[:, None] != enrolled[None, :],
        scores(x[imp], x[gallery]),
        np.asarray(genuine_pairs, np.float32),
        _oracle_pairs(x, labels, oracle, by_class, s.oracle_queries, rng),
        gallery_histogram(x[gallery], enrolled),
        traffic,
        null_maxima(x[gallery]),
    )


def _oracle_pairs(x, labels, classes, by_class, count, rng) -> np.ndarray:
    """Impostor scores of a labelled set shaped like the tenant's: one enrolment image per
    identity, other images of those identities as queries."""
    if len(classes) < 2:
        return np.zeros(0, np.float32)
    enrol = np.array([rng.choice(by_class[c]) for c in classes])
    pool = np.setdiff1d(np.concatenate([by_class[c] for c in classes]), enrol)
    if not len(pool):
        return np.zeros(0, np.float32)
    q = rng.choice(pool, min(len(pool), count), replace=False)
    s = scores(x[q], x[enrol])
    return s[labels[q][:, None] != classes[None, :]]


# ------------------------------------------------------------------ the methods
def _before(t: _Tenant, global_tail: ScoreHistogram, threshold: dict[float, float], s, rng) -> dict:
    """Raw thresholds as the server chose them before this change (server/tail_stats.py
    then: 32 sampled members per query, the matched identity left out, online share <= 0.5,
    scorenorm.build_map)."""
    gallery_map = build_map(t.hist, global_tail, s.tail)
    default = float(gallery_map.inverse(threshold[BEFORE_DEFAULT]))
    online = ScoreHistogram()
    items = len(t.gallery_ids)
    for row in t.warm:
        picks = rng.integers(0, items, BEFORE_SAMPLES)
        sample = row[picks]
        best = int(np.argmax(row))
        if row[best] >= default:
            sample = sample[t.gallery_ids[picks] != t.gallery_ids[best]]
        online.add(sample.astype(np.float32))
    mapping = build_map(mix(t.hist, online, BEFORE_WEIGHT), global_tail, s.tail)
    return {a: float(mapping.inverse(threshold[a])) for a in s.targets}


def _tenant_tail(tenants: Sequence[_Tenant], global_tail, threshold, s) -> list[dict]:
    """This version: each tenant's own evidence (gallery + traffic), shrunk toward the
    deployment prior pooled over every tenant of the split, as the server builds it."""
    traffic = [traffic_survival(t.traffic.fit(t.null), s.evidence) for t in tenants]
    maps = deployment_maps([t.hist for t in tenants], global_tail, s.tail, s.evidence, traffic)
    return [{a: float(m.inverse(threshold[a])) for a in s.targets} for m in maps]


def _monitor(t: _Tenant, thresholds: dict[float, float]) -> dict[float, dict[str, float]]:
    """Label-free FAR over the tenant's traffic (warm-up + evaluated impostors) at its
    served thresholds, before and after, against the truth of the same pairs."""
    window = np.concatenate([t.warm, t.eval_imp])
    impostor = np.concatenate([t.warm_impostor, np.ones(t.eval_imp.shape, bool)])
    best = np.argmax(window, axis=1)
    not_top = np.ones(window.shape, bool)
    top_ids = t.gallery_ids[best]
    not_top &= t.gallery_ids[None, :] != top_ids[:, None]
    tail = TrafficTail(scale=FISHER)  # the monitor's scale (server/matching/statistics.py)
    mu, _ = tail.add_scores(window)
    fit = tail.fit(t.null)
    out = {}
    for a, th in thresholds.items():
        hit = window >= th
        exceed = int((hit & impostor).sum())
        rb = np.bincount(bin_of(residual(th, mu, FISHER)), minlength=NBINS).astype(np.float64)
        out[a] = {
            "truth": exceed / int(impostor.sum()),
            "exceedances": exceed,
            "before": float((hit & not_top).sum() / max(not_top.sum(), 1)),
            "after": fit.far(rb, rb * window.shape[1]) if fit else float("nan"),
        }
    return out


# ------------------------------------------------------------------ the study
def run_split(
    emb: EmbeddingSet, doc: CalibrationDoc, s: CustomerSettings, split: int
) -> list[TenantOutcome]:
    rng = np.random.default_rng([s.seed, split])
    norm = doc.require_normalization("tenant-tail")
    global_tail = norm.global_tail
    threshold = {t.target_far: t.threshold for t in doc.targets()}
    missing = [a for a in (*s.targets, BEFORE_DEFAULT) if a not in threshold]
    if missing:
        raise ValueError(f"the calibration serves no threshold for target FAR {missing}")
    tenants = [t for k in range(len(emb.tenant_names)) if (t := _tenant(emb, k, s, rng))]
    served = _tenant_tail(tenants, global_tail, threshold, s)
    out = []
    for t, mine in zip(tenants, served, strict=True):
        chosen = {
            "raw": {a: threshold[a] for a in s.targets},
            "before": _before(t, global_tail, threshold, s, rng),
            "tenant-tail": mine,
            "oracle": {a: threshold_at(t.oracle, len(t.oracle), a) for a in s.targets},
        }
        imp, gen = {}, {}
        for method, ths in chosen.items():
            for a, found in ths.items():
                th = np.inf if found is None else found  # unmeasurable: nothing accepted
                imp[(method, a)] = (accepted(t.eval_imp.ravel(), th), t.eval_imp.size)
                gen[(method, a)] = (accepted(t.eval_gen, th), len(t.eval_gen))
        out.append(
            TenantOutcome(
                t.name, split, len(t.gallery_ids), len(t.warm), imp, gen, _monitor(t, mine)
            )
        )
    return out


@dataclass
class CustomerStudy:
    name: str
    settings: CustomerSettings
    outcomes: list[TenantOutcome]
    seconds: float

    def ratios(self, method: str, a: float) -> np.ndarray:
        """FAR / a per tenant and split (a tenant with no accept counts half an accept)."""
        return np.array(
            [
                max(o.impostor[(method, a)][0], 0.5) / o.impostor[(method, a)][1] / a
                for o in self.outcomes
            ]
        )

    def summary(self, method: str, a: float) -> dict[str, float]:
        r = self.ratios(method, a)
        splits = np.array([o.split for o in self.outcomes])
        std = float(np.mean([np.log10(r[splits == k]).std() for k in np.unique(splits)]))
        acc = sum(o.impostor[(method, a)][0] for o in self.outcomes)
        pairs = sum(o.impostor[(method, a)][1] for o in self.outcomes)
        gacc = sum(o.genuine[(method, a)][0] for o in self.outcomes)
        gpairs = sum(o.genuine[(method, a)][1] for o in self.outcomes)
        return {
            "pooled": acc / pairs / a,
            "std_log10": std,
            "within": float(np.mean((r >= 0.5) & (r <= 2.0))),
            "min": float(r.min()),
            "max": float(r.max()),
            "tar": gacc / gpairs if gpairs else float("nan"),
        }

    def monitor(self, a: float, which: str) -> dict[str, float]:
        """``which`` estimator ("before" / "after") against the truth: tenants judged (at
        least MONITOR_MIN_EXCEEDANCES true exceedances), the share of them within a
        factor MONITOR_FACTOR, the ratio's range, and the pooled ratio (pair-weighted)."""
        rows = [o.monitor[a] for o in self.outcomes if o.monitor[a]["truth"] > 0]
        judged = [m for m in rows if m["exceedances"] >= MONITOR_MIN_EXCEEDANCES]
        ratio = np.array([m[which] / m["truth"] for m in judged])
        pairs = np.array([m["exceedances"] / m["truth"] for m in rows])
        estimated = float(np.dot([m[which] for m in rows], pairs)) if rows else 0.0
        true = float(sum(m["exceedances"] for m in rows))
        nan = float("nan")
        inside = (ratio >= 1 / MONITOR_FACTOR) & (ratio <= MONITOR_FACTOR)
        return {
            "judged": len(judged),
            "within": float(np.mean(inside)) if len(judged) > 0 else nan,
            "min": float(ratio.min()) if len(judged) > 0 else nan,
            "max": float(ratio.max()) if len(judged) > 0 else nan,
            "pooled": estimated / true if true else nan,
        }


def run_study(
    emb: EmbeddingSet, doc: CalibrationDoc, s: CustomerSettings, progress: bool = True
) -> CustomerStudy:
    started = time.perf_counter()
    outcomes: list[TenantOutcome] = []
    for split in range(s.splits):
        t0 = time.perf_counter()
        outcomes += run_split(emb, doc, s, split)
        if progress:
            print(
                f"  {emb.name}: split {split + 1}/{s.splits} in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
    return CustomerStudy(emb.name, s, outcomes, time.perf_counter() - started)


# ------------------------------------------------------------------ report
def markdown(studies: Sequence[CustomerStudy], command: str) -> str:
    s = studies[0].settings
    out = [
        f"<!-- generated by: {command} -->",
        f"Protocol: {s.splits} splits; per tenant {s.identities[0]}-{s.identities[1]} enrolled "
        f"identities (one image each), {s.warmup[0]}-{s.warmup[1]} unlabelled warm-up queries "
        f"(genuine share {s.genuine_share[0]:.1f}-{s.genuine_share[1]:.1f}), then "
        f"{s.eval_impostors} impostor and {s.eval_genuine} genuine evaluated queries; oracle "
        f"from {s.oracle_queries} labelled queries of other identities of the same tenant; "
        f"evidence settings {s.evidence.to_json()}.",
        "",
    ]
    for st in studies:
        out += [f"### {st.name}", "", f"{len(st.outcomes)} tenant runs in {st.seconds:.0f} s.", ""]
        out += [*_summary_table(st), "", *_tenant_table(st), "", *_monitor_table(st), ""]
        out += ["Goals:", *goal_lines(st), ""]
    return "\n".join(out)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _summary_table(st: CustomerStudy) -> list[str]:
    rows = [
        _row("target", "method", "pooled FAR / a", "std log10(FAR/a)", "x floor")
        + " within [a/2, 2a] | FAR/a min .. max | TAR |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for a in st.settings.targets:
        floor = st.summary(FLOOR, a)["std_log10"]
        for m in METHODS:
            v = st.summary(m, a)
            rows.append(
                _row(
                    f"{a:g}",
                    m,
                    f"{v['pooled']:.2f}",
                    f"{v['std_log10']:.3f}",
                    f"{v['std_log10'] / floor:.2f}",
                    f"{v['within']:.2f}",
                    f"{v['min']:.2f} .. {v['max']:.2f}",
                    f"{v['tar']:.3f}",
                )
            )
    return rows


def _tenant_table(st: CustomerStudy) -> list[str]:
    """FAR / a per tenant, averaged over splits (geometric mean)."""
    names = list(dict.fromkeys(o.tenant for o in st.outcomes))
    columns = [f"{m} @ {a:g}" for a in st.settings.targets for m in METHODS]
    rows = [_row("tenant", "identities", *columns), "|---|---|" + "---:|" * len(columns)]
    for name in names:
        mine = [o for o in st.outcomes if o.tenant == name]
        cells = []
        for a in st.settings.targets:
            for m in METHODS:
                r = [max(o.impostor[(m, a)][0], 0.5) / o.impostor[(m, a)][1] / a for o in mine]
                cells.append(f"{np.exp(np.mean(np.log(r))):.2f}")
        sizes = sorted(o.identities for o in mine)
        rows.append(_row(name, f"{sizes[0]}-{sizes[-1]}", *cells))
    return rows


def _monitor_table(st: CustomerStudy) -> list[str]:
    rows = [
        f"Live monitor vs truth (judged: tenants with >= {MONITOR_MIN_EXCEEDANCES} true "
        "exceedances):",
        "",
        _row("target", "estimator", "judged", "within 2x", "ratio min .. max", "pooled / truth"),
        "|---|---|---:|---:|---|---:|",
    ]
    for a in st.settings.targets:
        for which in ("before", "after"):
            v = st.monitor(a, which)
            rows.append(
                _row(
                    f"{a:g}",
                    which,
                    v["judged"],
                    f"{v['within']:.2f}",
                    f"{v['min']:.2f} .. {v['max']:.2f}",
                    f"{v['pooled']:.2f}",
                )
            )
    rows += [
        "",
        _row("tenant", "split", "target", "truth FAR", "exceedances", "before", "after")
        + " after / truth |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in st.outcomes:
        for a, m in o.monitor.items():
            ratio = m["after"] / m["truth"] if m["truth"] > 0 else float("nan")
            rows.append(
                _row(
                    o.tenant,
                    o.split,
                    f"{a:g}",
                    f"{m['truth']:.2e}",
                    m["exceedances"],
                    f"{m['before']:.2e}",
                    f"{m['after']:.2e}",
                    f"{ratio:.2f}",
                )
            )
    return rows


def goal_lines(st: CustomerStudy) -> list[str]:
    """The goals of the issue, each with the measured number and met / MISSED."""
    lines = []
    lo, hi = GOAL_POOLED
    plo, phi = MONITOR_POOLED
    for a in st.settings.targets:
        v = st.summary("tenant-tail", a)
        ratio = v["std_log10"] / st.summary(FLOOR, a)["std_log10"]
        lines.append(
            f"- target {a:g}: pooled FAR {v['pooled']:.2f}x "
            f"({_verdict(lo <= v['pooled'] <= hi)}, goal [{lo}, {hi}]); spread {ratio:.2f}x "
            f"the floor ({_verdict(ratio <= GOAL_STD)}, goal <= {GOAL_STD})"
        )
        m = st.monitor(a, "after")
        lines.append(
            f"- target {a:g}: monitor within 2x for {m['within']:.0%} of {m['judged']} judged "
            f"tenant runs ({_verdict(m['within'] == 1.0)}, goal all); pooled monitor / truth "
            f"{m['pooled']:.2f} ({_verdict(plo <= m['pooled'] <= phi)}, goal [{plo}, {phi}])"
        )
    return lines


def to_json(st: CustomerStudy) -> dict:
    return {
        "dataset": st.name,
        "settings": {
            **asdict(st.settings),
            "tail": st.settings.tail.to_json(),
            "evidence": st.settings.evidence.to_json(),
        },
        "seconds": st.seconds,
        "summary": {f"{m}@{a:g}": st.summary(m, a) for a in st.settings.targets for m in METHODS},
        "monitor": {
            f"{w}@{a:g}": st.monitor(a, w) for a in st.settings.targets for w in ("before", "after")
        },
        "tenants": [
            {
                "tenant": o.tenant,
                "split": o.split,
                "identities": o.identities,
                "warmup": o.warmup,
                "far_ratio": {
                    f"{m}@{a:g}": o.impostor[(m, a)][0] / o.impostor[(m, a)][1] / a
                    for (m, a) in o.impostor
                },
                "monitor": {f"{a:g}": v for a, v in o.monitor.items()},
            }
            for o in st.outcomes
        ],
    }


# ------------------------------------------------------------------ command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m calibrate.studies.new_customer",
        description="Small tenants from data outside training and calibration, served with "
        "unlabelled traffic: per-tenant FAR of each method against the oracle floor, and the "
        "live monitor against the truth (docs/CONSISTENCY.md, 'New customers').",
    )
    p.add_argument("--dataset", default="novel", help="labelled set with tenants (default: novel)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--model", help="embedder (default: the shipped default)")
    p.add_argument("--calibration", help="calibration document (default: the shipped one)")
    p.add_argument("--target-far", default="1e-2,1e-3", help="comma-separated target FARs")
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior-pairs", type=float, default=EvidenceSettings().prior_pairs)
    p.add_argument("--out", type=Path, default=Path("out/new_customer"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from calibrate.inputs import InputError, embedded, model_file
    from contracts import CalibrationError, load_calibration

    args = parser().parse_args(argv)
    try:
        targets = tuple(float(v) for v in args.target_far.split(","))
        settings = CustomerSettings(
            targets=targets,
            splits=args.splits,
            seed=args.seed,
            evidence=EvidenceSettings(prior_pairs=args.prior_pairs),
        )
        model = model_file(args.model)
        doc = load_calibration(args.calibration or model.with_suffix(".calibration.json"))
        doc.check_model(model)
        emb = embedded(args.dataset, args.split, model, "cpu", not args.no_progress)
        study = run_study(emb, doc, settings, not args.no_progress)
    except (InputError, CalibrationError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = "python -m calibrate.studies.new_customer " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = markdown([study], command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "report.json").write_text(json.dumps(to_json(study), indent=1))
    print(text)
    print(f"\nwrote {args.out / 'report.md'} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
