"""Threshold-Consistent Margin (TCM) loss in matrix form, as a pytorch-metric-learning loss.

TCM penalises genuine pairs whose cosine similarity falls below ``margin_plus`` and impostor
pairs whose similarity rises above ``margin_minus``, each term averaged over its *active*
pairs only. Computing it from the B x M similarity matrix with boolean masks costs one GEMM
plus a few elementwise passes; gathering per-pair embeddings (as PML's reference does)
materialises O(B^2 D) tensors and is orders of magnitude slower.

Two ways to share the similarity matrix with a base loss, so TCM costs only its masks:

- give both losses the same :class:`SharedCosineSimilarity` instance as ``distance``; the
  second loss that asks for ``(embeddings, ref_emb)`` reuses the first one's matrix;
- or call :meth:`TCMLoss.from_similarity` with a matrix you already have.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu


class SharedCosineSimilarity(CosineSimilarity):
    """Cosine similarity that remembers its last matrix for the same input tensors.

    PML losses call ``self.distance(embeddings, ref_emb)``. When a base loss and TCM hold
    the same instance, the second call in a training step is a cache hit. The key is the
    identity (held, so it cannot be reused) and in-place version of both inputs, so a new
    batch (or an in-place edit) always recomputes; so does a matrix a loss edited in
    place. The cache holds one matrix; :meth:`clear` drops it early.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._key: tuple | None = None
        self._mat: torch.Tensor | None = None
        self._mat_version = -1
        self.hits = 0

    def forward(self, query_emb: torch.Tensor, ref_emb: torch.Tensor | None = None):
        ref = query_emb if ref_emb is None else ref_emb
        # The key keeps the input tensors themselves (compared with `is`), not their id():
        # a freed batch's id can be reused by the next batch.
        key = (query_emb, query_emb._version, ref, ref._version, torch.is_grad_enabled())
        # A loss that edited the cached matrix in place would poison the next one: check.
        if self._mat is not None and self._same(key) and self._mat._version == self._mat_version:
            self.hits += 1
            return self._mat
        mat = super().forward(query_emb, ref_emb)
        self._key, self._mat, self._mat_version = key, mat, mat._version
        return mat

    def _same(self, key: tuple) -> bool:
        old = self._key
        return (
            old is not None
            and old[0] is key[0]
            and old[2] is key[2]
            and (old[1], old[3], old[4]) == (key[1], key[3], key[4])
        )

    def clear(self) -> None:
        """Drop the cached matrix and inputs (the trainer calls this after each step)."""
        self._key, self._mat = None, None


class TCMLoss(BaseMetricLossFunction):
    """TCM regulariser (Zhang et al., 2023) on the cosine-similarity matrix.

    loss = lambda_plus * mean_{genuine, s <= m+}(m+ - s) + lambda_minus * mean_{impostor,
    s >= m-}(s - m-); a term with no active pair is 0. Pairs are all ordered pairs of the
    batch (self excluded), the pairs against ``ref_emb``, or those an ``indices_tuple``
    (pairs or triplets, e.g. from a miner) names, counted with multiplicity.
    """

    def __init__(
        self,
        lambda_plus: float = 1.0,
        lambda_minus: float = 1.0,
        margin_plus: float = 0.9,
        margin_minus: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        for name, value in (("lambda_plus", lambda_plus), ("lambda_minus", lambda_minus)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (it weighs a penalty), got {value}")
        self.lambda_plus = float(lambda_plus)
        self.lambda_minus = float(lambda_minus)
        self.margin_plus = float(margin_plus)
        self.margin_minus = float(margin_minus)
        self.add_to_recordable_attributes(
            list_of_names=["pos_term", "neg_term", "active_pos", "active_neg"], is_stat=True
        )

    def set_margins(self, margin_plus: float, margin_minus: float) -> None:
        """Move the margins (e.g. to the model's measured operating range) between steps."""
        self.margin_plus, self.margin_minus = float(margin_plus), float(margin_minus)

    def statistics(self) -> dict[str, float]:
        """What to log after a step: both terms, their active pair counts, the margins.

        A trainer logs whatever a loss reports here, so it never needs TCM's internals.
        """
        stats = {"margin_plus": self.margin_plus, "margin_minus": self.margin_minus}
        for name in ("pos_term", "neg_term", "active_pos", "active_neg"):
            value = getattr(self, name, None)
            if value is not None:  # None before the first forward
                stats[name] = float(value)
        return stats

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        sim = self.distance(embeddings, ref_emb)
        loss = self._from_matrix(sim, labels, indices_tuple, ref_labels, ref_labels is labels)
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}

    def from_similarity(
        self,
        sim: torch.Tensor,
        labels: torch.Tensor | None,
        ref_labels: torch.Tensor | None = None,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """TCM from a similarity matrix someone already computed (B x B or B x M).

        ``ref_labels=None`` means the columns are the batch itself, so the diagonal
        (self-pairs) is left out, as in :meth:`forward` without ``ref_emb``.
        """
        self.reset_stats()
        same_set = ref_labels is None
        ref = labels if same_set else ref_labels
        return self._from_matrix(sim, labels, indices_tuple, ref, same_set)

    def _from_matrix(self, sim, labels, indices_tuple, ref_labels, same_set: bool):
        pos, neg = pair_masks(sim, labels, ref_labels, indices_tuple, same_set)
        pos_active = pos & (sim <= self.margin_plus) if pos.dtype == torch.bool else None
        if pos_active is not None:
            neg_active = neg & (sim >= self.margin_minus)
            pos_num = torch.where(pos_active, self.margin_plus - sim, 0).sum()
            neg_num = torch.where(neg_active, sim - self.margin_minus, 0).sum()
            pos_den, neg_den = pos_active.sum(), neg_active.sum()
        else:  # pair counts from an indices_tuple (duplicates count)
            pos_w = pos * (sim <= self.margin_plus)
            neg_w = neg * (sim >= self.margin_minus)
            pos_num = (pos_w * (self.margin_plus - sim)).sum()
            neg_num = (neg_w * (sim - self.margin_minus)).sum()
            pos_den, neg_den = pos_w.sum(), neg_w.sum()
        pos_term = torch.where(pos_den > 0, pos_num / pos_den.clamp(min=1), 0)
        neg_term = torch.where(neg_den > 0, neg_num / neg_den.clamp(min=1), 0)
        # Detached tensors, not floats: recording must not force a device sync.
        self.pos_term, self.neg_term = pos_term.detach(), neg_term.detach()
        self.active_pos, self.active_neg = pos_den.detach(), neg_den.detach()
        # 0 * sum keeps the graph when nothing is active: a zero gradient, never None.
        return self.lambda_plus * pos_term + self.lambda_minus * neg_term + 0.0 * sim.sum()


def pair_masks(
    sim: torch.Tensor,
    labels: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    indices_tuple: tuple[torch.Tensor, ...] | None,
    same_set: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Genuine and impostor pairs of ``sim``: boolean masks, or counts from an indices_tuple."""
    if indices_tuple is None:
        if labels is None:
            raise ValueError("TCMLoss needs labels or an indices_tuple to know which pairs match")
        pos = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        neg = ~pos
        if same_set:
            pos.fill_diagonal_(False)
        return pos, neg
    a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
    return _counts(sim, a1, p), _counts(sim, a2, n)


def _counts(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    counts = torch.zeros(sim.shape, dtype=sim.dtype, device=sim.device)
    ones = torch.ones(len(rows), dtype=sim.dtype, device=sim.device)
    return counts.index_put_((rows.to(sim.device), cols.to(sim.device)), ones, accumulate=True)


class TCMCrossBatchMemory(CrossBatchMemory):
    """PML's CrossBatchMemory that also accepts TCMLoss (it handles ``ref_emb`` correctly)."""

    @staticmethod
    def supported_losses() -> list[str]:
        return [*CrossBatchMemory.supported_losses(), "TCMLoss"]
