"""Base metric losses from pytorch-metric-learning, registered by name, plus the TCM term.

Every factory takes a :class:`LossContext` (what a loss may need to know about the run)
and its own keyword parameters, whose defaults are the recipe's. Losses on normalised
embeddings get the run's one :class:`~train.losses.SharedCosineSimilarity` as
``distance``, so TCM reuses their batch similarity matrix instead of recomputing it.
Proxy and classifier losses (proxy_anchor, arcface) own parameters that the trainer
optimises with their own learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytorch_metric_learning import losses

from train.losses import SharedCosineSimilarity, TCMLoss
from train.registry import LOSSES


@dataclass(frozen=True)
class LossContext:
    """What a base loss factory may use besides its own parameters."""

    num_classes: int
    embedding_dim: int
    distance: SharedCosineSimilarity = field(default_factory=SharedCosineSimilarity)


@LOSSES.register("multi_similarity")
def multi_similarity(
    ctx: LossContext, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5
) -> losses.BaseMetricLossFunction:
    """MultiSimilarityLoss (Wang et al. 2019): pair weighting on the similarity matrix."""
    return losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base, distance=ctx.distance)


@LOSSES.register("proxy_anchor")
def proxy_anchor(
    ctx: LossContext, margin: float = 0.1, alpha: float = 32.0
) -> losses.BaseMetricLossFunction:
    """ProxyAnchorLoss (Kim et al. 2020): one learnt proxy per train class."""
    return losses.ProxyAnchorLoss(ctx.num_classes, ctx.embedding_dim, margin=margin, alpha=alpha)


@LOSSES.register("smooth_ap")
def smooth_ap(ctx: LossContext, temperature: float = 0.01) -> losses.BaseMetricLossFunction:
    """SmoothAPLoss (Brown et al. 2020): a smoothed average-precision ranking loss."""
    return losses.SmoothAPLoss(temperature=temperature, distance=ctx.distance)


@LOSSES.register("arcface")
def arcface(
    ctx: LossContext, margin: float = 28.6, scale: float = 64.0
) -> losses.BaseMetricLossFunction:
    """ArcFaceLoss (Deng et al. 2019): additive angular margin classifier."""
    return losses.ArcFaceLoss(ctx.num_classes, ctx.embedding_dim, margin=margin, scale=scale)


@LOSSES.register("contrastive")
def contrastive(
    ctx: LossContext, pos_margin: float = 1.0, neg_margin: float = 0.4
) -> losses.BaseMetricLossFunction:
    """ContrastiveLoss on cosine similarity (pull genuine above, push impostors below)."""
    return losses.ContrastiveLoss(
        pos_margin=pos_margin, neg_margin=neg_margin, distance=ctx.distance
    )


@LOSSES.register("triplet_margin")
def triplet_margin(ctx: LossContext, margin: float = 0.1) -> losses.BaseMetricLossFunction:
    """TripletMarginLoss on cosine similarity, all triplets of the batch."""
    return losses.TripletMarginLoss(margin=margin, distance=ctx.distance)


@LOSSES.register("none")
def no_base_loss(ctx: LossContext) -> None:
    """No base loss: train on TCM alone (needs --tcm)."""
    return None


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
    ctx = LossContext(num_classes, dim)
    base = LOSSES.create(name, ctx, **(params or {}))
    out: dict[str, losses.BaseMetricLossFunction] = {}
    if base is not None:
        out["base"] = base
    if tcm is not None:
        out["tcm"] = TCMLoss(distance=ctx.distance, **tcm)
    if not out:
        raise ValueError("loss 'none' needs TCM on (--tcm): nothing would be trained")
    return out
