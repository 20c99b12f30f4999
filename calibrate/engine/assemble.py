"""Turn the counts of the passes into rates, utilities, OPIS and the result objects."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from calibrate.consistency import eps_opis, opis, opis_terms, utility
from calibrate.engine.grids import GridCounts
from calibrate.engine.prepare import Prepared
from calibrate.engine.results import DatasetAtTarget, DatasetResult, Evaluation, Opis, TargetResult
from calibrate.engine.sweep import Genuine
from calibrate.engine.tail import Tail
from scorenorm import ScoreHistogram

FEW_ERRORS = 30  # fewer accepted impostors than this: the FAR rests on too few errors
TOP1_EDGES = np.linspace(-1.0, 1.0, 201)


@dataclass(frozen=True)
class Measured:
    """Raw results of the passes, before rates are formed."""

    prep: Prepared
    ranks: Any  # evaluate._Ranks
    tails: list[Tail]
    pool: Tail
    pool_t: dict[str, float | None]
    ds_t: list[dict[str, float | None]]
    global_t: list[float | None]
    pool_range: tuple[float, float] | None
    own_ranges: list[tuple[float, float] | None]
    best_impostor: np.ndarray
    genuine: Genuine
    impostor_counts: dict[str, GridCounts]
    genuine_counts: dict[str, GridCounts]
    intervals: list[Any] | None = None  # per target, from the bootstrap

    def with_intervals(self, intervals: list[Any]) -> Measured:
        return replace(self, intervals=intervals)


def class_rates(m: Measured, grid: str) -> tuple[np.ndarray, np.ndarray]:
    """(TAR, FAR) per class at each threshold of a grid; NaN rows for 1-image classes."""
    prep = m.prep
    n = prep.class_size.astype(np.float64)
    gen_pairs = n * (n - 1) / 2
    imp_pairs = prep.class_impostor_pairs().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tar = m.genuine_counts[grid].at_least() / gen_pairs[:, None]
        far = m.impostor_counts[grid].at_least() / imp_pairs[:, None]
    return tar, far


def dataset_rates(m: Measured, grid: str) -> tuple[np.ndarray, np.ndarray]:
    """(TAR, FAR) per dataset at each grid threshold, pairs inside the dataset only."""
    prep = m.prep
    imp = m.impostor_counts[grid].at_least()
    gen = m.genuine_counts[grid].at_least()
    tar = np.zeros((prep.n_datasets, imp.shape[1]))
    far = np.zeros_like(tar)
    for k in range(prep.n_datasets):
        cs = prep.ds_classes(k)
        far[k] = imp[cs].sum(axis=0) / 2 / prep.impostor_pairs(k)
        tar[k] = gen[cs].sum(axis=0) / prep.genuine_pairs(k)
    return tar, far


def assemble(m: Measured, *, beta: float, eps: float, settings: dict[str, Any]) -> Evaluation:
    prep = m.prep
    usable = prep.class_size >= 2
    class_u = None
    if m.pool_range is not None:
        tar, far = class_rates(m, "pooled")
        class_u = utility(tar[usable], far[usable], beta)
        overall = Opis(opis(class_u), eps_opis(class_u, eps))
        ds_tar, ds_far = dataset_rates(m, "pooled")
        ds_u = utility(ds_tar, ds_far, beta)
        cross = Opis(opis(ds_u), eps_opis(ds_u, eps))
        drift = opis_terms(ds_u)
    else:
        overall = cross = Opis(None, None)
        ds_u, drift = None, None
    correct, queries, top1 = _nearest(m)
    datasets = [
        _dataset(m, k, beta, eps, ds_u, drift, correct, queries) for k in range(prep.n_datasets)
    ]
    targets = [_target(m, j, class_u, usable) for j in range(len(m.ranks.targets))]
    grid = None if m.pool_range is None else m.impostor_counts["pooled"].grids[0]
    far_curves = {}
    plot_grid = m.impostor_counts["plot"].grids[0]
    if plot_grid is not None:
        _, ds_far = dataset_rates(m, "plot")
        far_curves = {name: (plot_grid, ds_far[k]) for k, name in enumerate(prep.dataset_names)}
    return Evaluation(
        targets=targets,
        datasets=datasets,
        overall=overall,
        cross_dataset=cross,
        recall_at_1=float(correct[queries].mean()),
        similarity_range=m.pool_range,
        grid=grid,
        class_utility=class_u,
        class_names=[
            f"{prep.dataset_names[prep.class_ds[c]]}/{prep.class_names[c]}"
            for c in np.flatnonzero(usable)
        ],
        settings=settings,
        top1_edges=TOP1_EDGES,
        top1_counts={
            name: np.histogram(
                top1[prep.ds_rows(k)][np.isfinite(top1[prep.ds_rows(k)])], TOP1_EDGES
            )[0]
            for k, name in enumerate(prep.dataset_names)
        },
        embedding_dim=int(prep.x.shape[1]),
        far_curves=far_curves,
        global_tail=ScoreHistogram(m.pool.counts.copy(), int(m.pool.total)),
    )


def _nearest(m: Measured) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out top-1 inside each dataset: (correct, is_query, top-1 similarity).

    A query is correct when its best same-class score beats its best other-class
    score; a tie counts as a miss. Only rows whose class has another image are queries.
    """
    prep, g = m.prep, m.genuine
    best_same = np.full(len(prep.x), -np.inf, np.float32)
    np.maximum.at(best_same, g.rows, g.scores)
    np.maximum.at(best_same, g.cols, g.scores)
    correct = best_same > m.best_impostor
    queries = prep.class_size[prep.cls] >= 2
    return correct, queries, np.maximum(best_same, m.best_impostor)


def _dataset(m, k, beta, eps, ds_u, drift, correct, queries) -> DatasetResult:
    prep = m.prep
    sizes = prep.class_size[prep.class_ds == k]
    own = Opis(None, None)
    if m.own_ranges[k] is not None:
        tar, far = class_rates(m, "own")
        sel = (prep.class_ds == k) & (prep.class_size >= 2)
        u = utility(tar[sel], far[sel], beta)
        own = Opis(opis(u), eps_opis(u, eps))
    rows = prep.ds_rows(k)
    q = queries[rows]
    return DatasetResult(
        name=prep.dataset_names[k],
        images=prep.ds_size(k),
        classes=int((sizes >= 2).sum()),
        excluded_classes=int((sizes < 2).sum()),
        genuine_pairs=prep.genuine_pairs(k),
        impostor_pairs=prep.impostor_pairs(k),
        opis=own,
        opis_drift=None if drift is None else float(drift[k]),
        similarity_range=m.own_ranges[k],
        recall_at_1=float(correct[rows][q].mean()) if q.any() else None,
        utility=None if ds_u is None else ds_u[k],
    )


def _target(m: Measured, j: int, class_u, usable) -> TargetResult:
    prep, ranks = m.prep, m.ranks
    a, t, name = ranks.targets[j], m.global_t[j], f"target{j}"
    k = ranks.pool_k[name]
    gen_total = int(sum(prep.genuine_pairs(i) for i in range(prep.n_datasets)))
    warnings: list[str] = []
    if t is None:
        warnings.append(
            f"target FAR {a:g} is not measurable: {ranks.m} impostor pairs allow "
            f"floor(a*M) = 0 errors; it needs at least {int(np.ceil(1 / a))} impostor pairs"
        )
        return TargetResult(
            a,
            False,
            k,
            ranks.m,
            gen_total,
            None,
            None,
            None,
            None,
            _datasets_at(m, j, None),
            [],
            warnings,
        )
    accepted = m.pool.count_at_least(t)
    if accepted < FEW_ERRORS:
        warnings.append(
            f"only {accepted} impostor pairs are accepted at the threshold (< {FEW_ERRORS}): "
            "the achieved FAR rests on few errors; calibrate on more images"
        )
    tar = float((m.genuine.scores >= t).sum() / gen_total)
    ci = m.intervals[j] if m.intervals else None
    return TargetResult(
        target_far=a,
        measurable=True,
        k=k,
        impostor_pairs=ranks.m,
        genuine_pairs=gen_total,
        threshold=t,
        accepted_impostors=accepted,
        achieved_far=accepted / ranks.m,
        tar=tar,
        datasets=_datasets_at(m, j, t),
        classes=_classes_at(m, t, class_u, usable),
        warnings=warnings,
        ci=ci,
    )


def _datasets_at(m: Measured, j: int, t: float | None) -> list[DatasetAtTarget]:
    prep, ranks = m.prep, m.ranks
    a, name = ranks.targets[j], f"target{j}"
    gen_ds = prep.class_ds[prep.cls[m.genuine.rows]]
    out = []
    for k, ds in enumerate(prep.dataset_names):
        own = m.ds_t[k][name]
        mk, gk = prep.impostor_pairs(k), prep.genuine_pairs(k)
        acc = m.tails[k].count_at_least(t) if t is not None else None
        far = None if acc is None else acc / mk
        frr = None
        if t is not None:
            frr = 1.0 - float((m.genuine.scores[gen_ds == k] >= t).sum() / gk)
        out.append(
            DatasetAtTarget(
                name=ds,
                measurable=own is not None,
                k=ranks.ds_k[k][name],
                impostor_pairs=mk,
                genuine_pairs=gk,
                far=far,
                frr=frr,
                far_ratio=None if far is None else far / a,
                threshold=own,
                threshold_drift=None if own is None or t is None else own - t,
                accepted_impostors=acc,
            )
        )
    return out


def _classes_at(m: Measured, t: float, class_u, usable) -> list[dict[str, Any]]:
    """Per class (2+ images): TAR and FAR at the threshold, mean utility over the range."""
    prep = m.prep
    grid = m.impostor_counts["targets"].grids[0]
    g = int(np.flatnonzero(grid == t)[0])
    tar, far = class_rates(m, "targets")
    mean_u = class_u.mean(axis=1) if class_u is not None else None
    out = []
    for row, c in enumerate(np.flatnonzero(usable)):
        out.append(
            {
                "name": prep.class_names[c],
                "dataset": prep.dataset_names[prep.class_ds[c]],
                "images": int(prep.class_size[c]),
                "tar": float(tar[c, g]),
                "far": float(far[c, g]),
                "mean_utility": None if mean_u is None else float(mean_u[row]),
            }
        )
    return out
