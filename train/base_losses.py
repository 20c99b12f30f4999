"""Base metric losses by pytorch-metric-learning name, plus the optional TCM term.

Losses on normalised embeddings use cosine similarity, and all of them that ask for
the batch similarity matrix get one :class:`~train.losses.SharedCosineSimilarity`
instance together with TCM, so TCM reuses their matrix instead of recomputing it.
Proxy and classifier losses (proxy_anchor, arcface) own parameters that the trainer
optimises with their own learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pytorch_metric_learning import losses

from train.losses import SharedCosineSimilarity, TCMLoss

# name -> (factory(num_classes, dim, distance, **params), default params)
Factory = Callable[..., losses.BaseMetricLossFunction]

BASE_LOSSES: dict[str, tuple[Factory, dict[str, Any]]] = {
    "multi_similarity": (
        lambda c, d, dist, **p: losses.MultiSimilarityLoss(distance=dist, **p),
        {"alpha": 2.0, "beta": 50.0, "base": 0.5},
    ),
    "proxy_anchor": (
        lambda c, d, dist, **p: losses.ProxyAnchorLoss(c, d, **p),
        {"margin": 0.1, "alpha": 32.0},
    ),
    "smooth_ap": (
        lambda c, d, dist, **p: losses.SmoothAPLoss(distance=dist, **p),
        {"temperature": 0.01},
    ),
    "arcface": (
        lambda c, d, dist, **p: losses.ArcFaceLoss(c, d, **p),
        {"margin": 28.6, "scale": 64.0},
    ),
    "contrastive": (
        lambda c, d, dist, **p: losses.ContrastiveLoss(distance=dist, **p),
        {"pos_margin": 1.0, "neg_margin": 0.4},
    ),
    "triplet_margin": (
        lambda c, d, dist, **p: losses.TripletMarginLoss(distance=dist, **p),
        {"margin": 0.1},
    ),
    "none": (lambda c, d, dist, **p: None, {}),
}


def build_losses(
    name: str,
    num_classes: int,
    dim: int,
    params: dict[str, Any] | None = None,
    tcm: dict[str, float] | None = None,
) -> dict[str, losses.BaseMetricLossFunction]:
    """The named base loss (``base``) and, when ``tcm`` gives its parameters, ``tcm``.

    ``name="none"`` trains on TCM alone (it then must be enabled).
    """
    if name not in BASE_LOSSES:
        raise ValueError(f"unknown base loss {name!r}; choose one of {sorted(BASE_LOSSES)}")
    factory, defaults = BASE_LOSSES[name]
    shared = SharedCosineSimilarity()
    try:
        base = factory(num_classes, dim, shared, **{**defaults, **(params or {})})
    except TypeError as err:
        raise ValueError(f"bad parameters for loss {name!r}: {err}") from err
    out: dict[str, losses.BaseMetricLossFunction] = {}
    if base is not None:
        out["base"] = base
    if tcm is not None:
        out["tcm"] = TCMLoss(distance=shared, **tcm)
    if not out:
        raise ValueError("loss 'none' needs TCM on (--tcm): nothing would be trained")
    return out
