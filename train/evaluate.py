"""Held-out evaluation: Recall@1, MAP@R, OPIS, eps-OPIS and per-tenant FAR at a global threshold.

Everything threshold-related (exact order-statistic thresholds, per-class and per-tenant
utility, OPIS, eps-OPIS, Recall@1) comes from :func:`calibrate.evaluate`, the project's
one implementation, so a training run reports the numbers calibrate will later measure
on the exported model. Only MAP@R, which calibrate does not report, is computed here.
Tenants are calibrate's datasets: pairs never cross tenants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibrate import evaluate as calibrate_evaluate
from imagesets import EmbeddingSet

BLOCK = 1024


@dataclass
class Curves:
    """Per-member utility curves over the pooled calibration grid (for figures)."""

    grid: np.ndarray  # (G,) similarity thresholds
    class_utility: np.ndarray  # (T, G)
    tenant_utility: np.ndarray  # (K, G)


def _blocks(n: int):
    for start in range(0, n, BLOCK):
        yield slice(start, min(start + BLOCK, n))


def map_at_r(embeddings: np.ndarray, labels: np.ndarray, tenants: np.ndarray) -> float:
    """MAP@R, leave-one-out, each query ranked against its own tenant only.

    The same protocol as calibrate's Recall@1 and thresholds (pairs never cross
    tenants): a tenant's gallery is all a deployed query is ever compared with. R is
    the number of other images of the query's class; queries with R = 0 are skipped.
    """
    ap_sum, counted = 0.0, 0
    for tenant in np.unique(tenants):
        idx = np.flatnonzero(tenants == tenant)
        emb, lab = embeddings[idx], labels[idx]
        _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
        r = counts[inverse.reshape(-1)] - 1
        k = int(r.max()) if len(r) else 0
        if k == 0:
            continue
        for rows in _blocks(len(idx)):
            sim = emb[rows] @ emb.T
            sim[np.arange(rows.stop - rows.start), np.arange(rows.start, rows.stop)] = -np.inf
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            order = np.take_along_axis(sim, top, 1).argsort(axis=1, kind="stable")[:, ::-1]
            top = np.take_along_axis(top, order, 1)
            correct = lab[top] == lab[rows, None]
            rr = r[rows]
            in_r = np.arange(1, k + 1)[None, :] <= rr[:, None]
            precision = np.cumsum(correct, 1) / np.arange(1, k + 1)[None, :]
            ap = (precision * correct * in_r).sum(1) / np.maximum(rr, 1)
            ap_sum += float(ap[rr > 0].sum())
            counted += int((rr > 0).sum())
    return ap_sum / max(counted, 1)


def evaluate_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    tenants: np.ndarray,
    tenant_names: tuple[str, ...],
    target_far: float = 1e-3,
    far_range: tuple[float, float] = (1e-4, 1e-2),
    grid_size: int = 101,
    eps: float = 0.05,
) -> tuple[dict, Curves]:
    """All held-out metrics of one embedding set (flat dict for metrics.json), and curves."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    dense = np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)
    names = tuple(str(c) for c in range(int(dense.max()) + 1))
    es = EmbeddingSet("heldout", dense, names, np.asarray(tenants, np.int64), tenant_names, emb)
    ev = calibrate_evaluate(
        es, target_fars=(target_far,), far_range=far_range, grid_size=grid_size, eps=eps
    )
    target = ev.target(target_far)
    measured = [d for d in target.datasets if d.measurable and d.far is not None]
    fars = np.array([d.far for d in measured], dtype=np.float64)
    far_min = float(fars.min()) if len(fars) else math.nan
    far_max = float(fars.max()) if len(fars) else math.nan
    map_r = map_at_r(emb, dense, np.asarray(tenants))
    metrics = {
        "recall_at_1": ev.recall_at_1,
        "map_at_r": map_r,
        "opis": ev.overall.opis,
        "eps_opis": ev.overall.eps_opis,
        "tenant_opis": ev.cross_dataset.opis,
        "target_far": target_far,
        "global_threshold": target.threshold,
        "global_distance": target.distance,
        "achieved_far": target.achieved_far,
        "tar": target.tar,  # genuine pairs (within tenants) accepted at the global threshold
        "tenant_far": {d.name: d.far for d in measured},
        "far_min": far_min,
        "far_max": far_max,
        # max/min over tenants where the target is measurable; infinite (null in JSON)
        # when one of them accepted no impostor at the global threshold
        "far_spread": far_max / far_min if far_min > 0 else math.inf,
        "tenants_unmeasurable": [d.name for d in target.datasets if not d.measurable],
        "calibration_range": list(ev.similarity_range) if ev.similarity_range else None,
        "images": len(emb),
        "classes": int(sum(d.classes for d in ev.datasets)),
        "impostor_pairs": target.impostor_pairs,
        "warnings": list(target.warnings),
    }
    tenant_u = [d.utility for d in ev.datasets if d.utility is not None]
    curves = Curves(
        grid=np.asarray(ev.grid),
        class_utility=np.asarray(ev.class_utility),
        tenant_utility=np.stack(tenant_u) if tenant_u else np.zeros((0, len(ev.grid))),
    )
    return metrics, curves


# ---- python -m train.evaluate: exported models side by side ---------------------------
ROWS = (
    ("Recall@1", "recall_at_1", "{:.4f}"),
    ("MAP@R", "map_at_r", "{:.4f}"),
    ("OPIS", "opis", "{:.3e}"),
    ("eps-OPIS", "eps_opis", "{:.4f}"),
    ("tenant OPIS", "tenant_opis", "{:.3e}"),
    ("TAR at target FAR", "tar", "{:.4f}"),
    ("global threshold (similarity)", "global_threshold", "{:.4f}"),
    ("tenant FAR min", "far_min", "{:.2e}"),
    ("tenant FAR max", "far_max", "{:.2e}"),
    ("tenant FAR max/min", "far_spread", "{:.1f}"),
)


def evaluate_model(
    model: str | Path, dataset: str = "glyphs", split: str = "test", target_far: float = 1e-3
) -> dict:
    """The training metrics of an exported ``.onnx`` model (onnxruntime, no torch)."""
    from embedding import OnnxEmbedder
    from imagesets import load_images

    images = load_images(dataset, split)
    emb = OnnxEmbedder(model, device="cpu").embed_set(images, progress=f"embed {Path(model).name}")
    metrics, _ = evaluate_embeddings(
        emb, images.labels, images.tenants, images.tenant_names, target_far=target_far
    )
    return metrics


def side_by_side(named: dict[str, dict]) -> str:
    """A Markdown table with one column per model."""
    names = list(named)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for title, key, fmt in ROWS:
        cells = []
        for n in names:
            v = named[n].get(key)
            ok = v is not None and not (isinstance(v, float) and not math.isfinite(v))
            cells.append(fmt.format(v) if ok else "n/a")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Held-out metrics of exported models, side by side (the metrics.json "
        "definitions: calibrate's thresholds and OPIS, pairs within tenants).",
    )
    parser.add_argument("models", nargs="+", type=Path, help=".onnx files")
    parser.add_argument("--dataset", default="glyphs")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--target-far", type=float, default=1e-3)
    parser.add_argument("--json", type=Path, help="also write every metric to this file")
    args = parser.parse_args(argv)
    named = {
        str(m): evaluate_model(m, args.dataset, args.split, args.target_far) for m in args.models
    }
    if args.json:
        args.json.write_text(json.dumps(json_safe(named), indent=2) + "\n")
    print(side_by_side(named))
    return 0


def json_safe(value):
    """JSON has no infinity or NaN: an unmeasurable value becomes null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    raise SystemExit(main())
